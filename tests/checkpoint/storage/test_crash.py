"""SIGKILL at random moments never leaves a torn or partial checkpoint at the path."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from torchaux.checkpoint.storage.commit import TEMP_MARKER, remove_stale_temps

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multiprocess,
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL"),
]

KILLS = 8
SEED = 20240611

# Saves one ~32 MiB state to one path forever; every tensor (and "step")
# holds the step number, so a file mixing two saves is detectable.
CHILD = textwrap.dedent(
    """
    import sys
    import torch, torchaux

    path, step = sys.argv[1], int(sys.argv[2])
    n = 8 << 20  # bytes per tensor
    state = {
        "f32": torch.empty(n // 4, dtype=torch.float32),
        "i64": torch.empty(n // 8, dtype=torch.int64),
        "f16": torch.empty(n // 2, dtype=torch.float16),
        "f64": torch.empty(n // 8, dtype=torch.float64),
        "step": -1,
    }
    print("ready", flush=True)
    while True:
        for key in ("f32", "i64", "f16", "f64"):
            state[key].fill_(step)
        state["step"] = step
        print("saving", step, flush=True)
        torchaux.save_async(state, path).wait()
        print("committed", step, flush=True)
        step += 1
    """
)


def _steps(lines: list[str], word: str) -> list[int]:
    return [int(line.split()[1]) for line in lines if line.startswith(word + " ")]


def test_sigkill_never_leaves_a_torn_checkpoint(tmp_path: pathlib.Path) -> None:
    """After each of 8 SIGKILLs at random moments the path loads, holds one single step, never rolls back."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    path = ckpt_dir / "ckpt.pt"
    rng = random.Random(SEED)
    next_step = 0
    last_committed = -1
    temps: list[str] = []
    for kill in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), str(next_step)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        try:
            lines = [proc.stdout.readline()]  # type: ignore[union-attr]
            assert lines == ["ready\n"], proc.communicate(timeout=60)
            if kill == 0:  # the path must exist before the first kill
                while not lines[-1].startswith("committed"):
                    lines.append(proc.stdout.readline())  # type: ignore[union-attr]
                    assert lines[-1], "child exited before its first commit"
            delay = rng.uniform(0.0, 0.6)
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=delay)  # the child must still be saving when killed
            os.kill(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, err
        lines += out.splitlines(keepends=True)
        saving, committed = _steps(lines, "saving"), _steps(lines, "committed")
        assert saving, "the child was killed before its first save"
        last_committed = max(committed, default=last_committed)

        state = torch.load(path, weights_only=True)
        step = state["step"]
        for key in ("f32", "i64", "f16", "f64"):
            t = state[key]
            assert t.numel() * t.element_size() == 8 << 20, key
            assert bool((t == step).all()), f"kill {kill}: {key} mixes steps (file says step {step})"
        assert last_committed <= step <= max(saving), (kill, last_committed, step, max(saving))

        names = os.listdir(ckpt_dir)
        assert "ckpt.pt" in names
        temps = [n for n in names if n != "ckpt.pt"]
        assert all(n.startswith(".ckpt.pt" + TEMP_MARKER) for n in temps), names
        next_step = max(saving) + 1

    removed = remove_stale_temps(str(ckpt_dir))  # every temp belongs to a dead child
    assert sorted(os.path.basename(p) for p in removed) == sorted(temps)
    assert os.listdir(ckpt_dir) == ["ckpt.pt"]
