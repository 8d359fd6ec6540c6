"""SIGKILL during manager saves: a new manager in a fresh process resumes from a complete step."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

WORKER = str(Path(__file__).with_name("manager_kill_worker.py"))
WAIT_S = 120.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return env


def _kill_during_saves(directory: str, options: dict[str, Any] | None, seed: int) -> None:
    rng = random.Random(seed)
    committed: list[int] = []
    first = threading.Event()
    child = subprocess.Popen(
        [sys.executable, WORKER, "train", directory, json.dumps(options)],
        stdout=subprocess.PIPE, text=True, env=_env(),
    )

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("committed "):
                committed.append(int(line.split()[1]))
                first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert first.wait(WAIT_S), "the child never committed a step"
        # A random moment within the next few saves: mid-write, mid-publish or mid-retention.
        threading.Event().wait(rng.uniform(0.0, 0.4))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT_S)
        reader.join(WAIT_S)
    last = max(committed)
    check = subprocess.run(
        [sys.executable, WORKER, "check", directory, json.dumps(options)],
        capture_output=True, text=True, env=_env(), timeout=WAIT_S,
    )
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout.strip().splitlines()[-1])
    # The kill may land after a commit but before the child printed it: at most one newer.
    assert report["latest"] in (last, last + 1), (report, last)
    assert report["exact"] is True, report
    # Retention never deleted the newest committed step (it may lag: it runs in the background).
    assert report["all"][-1] == report["latest"] and last in report["all"], report


def _seeds(n: int) -> list[int]:
    return list(range(n))


@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", _seeds(2))
def test_sigkill_local_resumes_from_a_complete_step(tmp_path: Path, seed: int) -> None:
    _kill_during_saves(str(tmp_path / "run"), None, seed)
    leftovers = [n for n in os.listdir(tmp_path / "run") if "torchaux-tmp" in n]
    assert leftovers == []  # the check's manager removed the killed save's temp folder


@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", _seeds(1))
def test_sigkill_s3_resumes_from_a_complete_step(s3_bucket: Any, seed: int) -> None:
    _kill_during_saves(s3_bucket.url("run"), s3_bucket.storage_options, seed)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", _seeds(20))
def test_sigkill_local_20_seeds(tmp_path: Path, seed: int) -> None:
    _kill_during_saves(str(tmp_path / "run"), None, 1000 + seed)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("seed", _seeds(5))
def test_sigkill_s3_5_seeds(s3_bucket: Any, seed: int) -> None:
    _kill_during_saves(s3_bucket.url("run"), s3_bucket.storage_options, 1000 + seed)
