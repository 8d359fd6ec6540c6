"""Repeated saves of one state do not grow peak memory (buffers are reused, never accumulated)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multiprocess,
    pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc/self/status (Linux)"),
]

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch, torchaux

    def peak_rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    path = sys.argv[1]
    torch.manual_seed(0)
    state = {f"t{i}": torch.randn(4 << 20) for i in range(4)}  # 4 x 16 MiB
    state["step"] = 0
    nbytes = sum(t.untyped_storage().nbytes() for k, t in state.items() if k != "step")
    saver = torchaux.AsyncSaver()
    torchaux.save_async(state, path, saver=saver).wait()
    base = peak_rss()
    for step in range(1, 21):
        for key in ("t0", "t1", "t2", "t3"):
            state[key].add_(1)
        state["step"] = step
        torchaux.save_async(state, path, saver=saver).wait()
    peak = peak_rss()
    loaded = torch.load(path, weights_only=True)
    same = loaded["step"] == 20 and all(
        torch.equal(loaded[k], state[k]) for k in ("t0", "t1", "t2", "t3")
    )
    print(json.dumps({"base": base, "peak": peak, "nbytes": nbytes,
                      "cached": saver.pool.cached_bytes(), "same": same}))
    """
)


def test_twenty_saves_do_not_grow_peak_rss(tmp_path: pathlib.Path) -> None:
    """20 saves of a 64 MiB state after the first raise peak RSS (VmHWM) by less than one state size."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, TORCHAUX_FSYNC="0")  # durability is not under test; keep it fast
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["nbytes"] == 64 << 20
    assert report["same"] is True  # the last save holds the last values
    assert report["cached"] == report["nbytes"]  # one state's buffers, reused
    growth = report["peak"] - report["base"]
    assert growth < report["nbytes"], f"peak RSS grew by {growth / 2**20:.1f} MiB over 20 saves"
