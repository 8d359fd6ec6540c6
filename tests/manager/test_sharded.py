"""CheckpointManager on 2 spawned gloo ranks (tests src/torchaux/manager/sharded.py and group.py).

The first run saves FSDP2 + Adam state every 2 steps with retention, checks
that the ranks agree on signals, force, bad arguments and failures; new
processes then resume from the newest step; one plain process restores the
2-rank step resharded; SIGKILLs of one rank during saves never leave a
partial step behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import manager_dist_workers as workers
import torchaux
from torchaux.manager.steps import METADATA_NAME

pytestmark = pytest.mark.multiprocess

WAIT_S = 120.0


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    # A crashed distributed save's temp folder and a replaced step's aside copy: orphans.
    for orphan in (".step-9.torchaux-tmp-dist_dead_0", ".step-1.torchaux-old-ab"):
        os.makedirs(root / "run" / orphan / ".torchaux-tmp-gen")
    workers.run("first_run", 2, str(root))
    return root


def test_retention_keeps_latest_two_and_rank0s_best(first_run: Path) -> None:
    run = first_run / "run"
    assert sorted(os.listdir(run)) == ["latest", "step-2", "step-6", "step-8"]  # orphans gone
    assert (run / "latest").read_text() == "8\n"
    meta = json.loads((run / "step-2" / METADATA_NAME).read_text())
    assert meta["layout"] == "distributed" and meta["metrics"] == {"loss": 0.1}
    step = sorted(os.listdir(run / "step-8"))
    assert ".metadata" in step and sum(n.endswith(".distcp") for n in step) == 2, step


def test_encrypted_distributed_step_records_its_mode(first_run: Path) -> None:
    meta = json.loads((first_run / "enc" / "step-0" / METADATA_NAME).read_text())
    assert meta["encrypted"] == "AES-GCM" and meta["layout"] == "distributed"


def test_new_processes_resume_from_the_newest_step(first_run: Path) -> None:
    workers.run("resume", 2, str(first_run))


def test_one_process_restores_the_two_rank_step_resharded(first_run: Path) -> None:
    expected = torch.load(first_run / "expected.pt", weights_only=True)
    with torchaux.CheckpointManager(first_run / "run", keep_latest=None) as mgr:
        assert mgr._sharded is None and mgr.latest_step() == 8
        workers.assert_same(expected, mgr.restore())  # whole, at the global shapes
        plain = workers.full(expected)
        for value in plain["model"].values():
            value.zero_()
        plain["tp"].zero_()
        assert mgr.restore(8, state=plain) is plain  # in place, from 2 shards into 1
        workers.assert_same(expected["model"], plain["model"])
        assert torch.equal(expected["tp"], plain["tp"])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    env["TORCHAUX_DISTRIBUTED_TIMEOUT_S"] = "30"
    return env


def _kill_during_saves(directory: Path, seed: int) -> None:
    """Start 2 ranks saving every step; SIGKILL one at a random moment, then the other."""
    rng = random.Random(seed)
    port = workers.dist_workers.free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, workers.__file__, "train", str(r), "2", str(port), str(directory)],
            stdout=subprocess.PIPE, text=True, env=_env(),
        )
        for r in range(2)
    ]
    committed: list[int] = []
    first = threading.Event()

    def read() -> None:
        assert ranks[0].stdout is not None
        for line in ranks[0].stdout:
            if line.startswith("committed "):
                committed.append(int(line.split()[1]))
                first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    victim = rng.randrange(2)
    try:
        assert first.wait(WAIT_S), "the ranks never committed a step"
        # A random moment within the next saves: staging, writing, voting, publishing, retention.
        threading.Event().wait(rng.uniform(0.0, 0.6))
    finally:
        ranks[victim].send_signal(signal.SIGKILL)
        threading.Event().wait(rng.uniform(0.0, 0.3))  # the survivor goes on a little
        ranks[1 - victim].send_signal(signal.SIGKILL)
        for child in ranks:
            child.wait(WAIT_S)
        reader.join(WAIT_S)
    workers.run("kill_check", 2, str(directory), max(committed))


def test_sigkill_of_one_rank_during_saves_resumes_from_a_complete_step(tmp_path: Path) -> None:
    _kill_during_saves(tmp_path / "run", seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_sigkill_seeded_runs(tmp_path: Path, seed: int) -> None:
    directory = tmp_path / "run"
    _kill_during_saves(directory, seed)
    _kill_during_saves(directory, seed + 100)  # killed again after resuming from the first


def test_a_coordinator_staging_failure_reaches_every_rank_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 failing to stage fails step 1 on both ranks without a timeout; step 2 then saves."""
    monkeypatch.setenv("TORCHAUX_DISTRIBUTED_TIMEOUT_S", "60")
    workers.run("coordinator_staging_failure", 2, str(tmp_path))
