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


CHANGING = textwrap.dedent(
    """
    import json, sys
    import torch, torchaux
    from torchaux import _knobs

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no " + field)

    path = sys.argv[1]
    saver = torchaux.AsyncSaver()
    torchaux.save_async({"warm": torch.ones(16)}, path, saver=saver).wait()  # threads, imports
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS (proc(5))
    base = status("VmHWM")
    largest = cached_max = 0
    for step in range(1, 41):
        # A fixed tensor plus one that grows every save: no size repeats.
        state = {"w": torch.ones(4 << 20), "hist": torch.zeros(step << 18)}
        nbytes = sum(t.untyped_storage().nbytes() for t in state.values())
        largest = max(largest, nbytes)
        torchaux.save_async(state, path, saver=saver).wait()
        cached_max = max(cached_max, saver.pool.cached_bytes())
        del state
    bounded = 3 * _knobs.direct_io_buffer_bytes() + _knobs.write_buffer_bytes()
    print(json.dumps({"base": base, "peak": status("VmHWM"), "largest": largest,
                      "bounded": bounded, "cached_max": cached_max}))
    """
)


#: Interpreter and torch bookkeeping a save allocates besides its buffers (pickle
#: payload, zip records, handles); measured peak growth was 160 MiB against a
#: 161 MiB bound, so 4 MiB only absorbs noise, never a leaked state (56 MiB here).
INTERPRETER_SLACK = 4 << 20


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs /proc/self/clear_refs")
def test_forty_saves_of_changing_sizes_keep_peak_rss_bounded(tmp_path: pathlib.Path) -> None:
    """Sizes change every save: peak RSS growth <= 2x the largest state + the bounded write buffers.

    The two states are the live one and its staged copy (which the pool keeps
    for the next save).  glibc's *dynamic* mmap threshold (mallopt(3)) would keep
    the script's own freed tensors resident in heap holes - torch.save alone
    shows that - so the child fixes the threshold at 1 MiB: what remains is
    what torchaux holds.  Before the pool was bounded, it cached every size
    ever saved (820 MiB here).
    """
    script = tmp_path / "child.py"
    script.write_text(CHANGING)
    env = dict(os.environ, TORCHAUX_FSYNC="0", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt.pt")], capture_output=True, text=True,
        timeout=300, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["largest"] == (16 << 20) + (40 << 20)
    assert r["cached_max"] <= r["largest"]  # the pool never keeps more than one state
    growth = r["peak"] - r["base"]
    bound = 2 * r["largest"] + r["bounded"] + INTERPRETER_SLACK
    assert growth <= bound, f"peak RSS grew {growth / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"
