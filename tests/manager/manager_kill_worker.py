"""Child process of test_manager_kill.py: ``train`` saves steps until killed; ``check`` resumes.

Usage: python manager_kill_worker.py {train,check} DIRECTORY OPTIONS_JSON
"""

from __future__ import annotations

import json
import sys

import torch

import torchaux

#: Elements of the state's big tensor: 4 MiB of float32, so a save takes a while.
NUMEL = 1 << 20


def state_for(step: int) -> dict[str, object]:
    return {"w": torch.full((NUMEL,), float(step)), "b": torch.arange(16) + step, "step": step}


def main() -> None:
    mode, directory, options_json = sys.argv[1:4]
    options = json.loads(options_json) or None
    mgr = torchaux.CheckpointManager(directory, keep_latest=2, storage_options=options)
    if mode == "train":
        start = (mgr.latest_step() or 0) + 1
        for step in range(start, start + 10_000):
            handle = mgr.save(step, state_for(step), metrics={"loss": 1.0 / step})
            assert handle is not None
            handle.wait()
            print(f"committed {step}", flush=True)
        return
    latest = mgr.latest_step()
    report: dict[str, object] = {"latest": latest, "all": mgr.all_steps()}
    if latest is not None:
        restored = mgr.restore()
        expected = state_for(latest)
        report["exact"] = (
            restored["step"] == latest and torch.equal(restored["w"], expected["w"])
            and torch.equal(restored["b"], expected["b"])
        )
    mgr.close()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
