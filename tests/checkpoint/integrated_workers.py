"""Spawned-rank workers for ``save_checkpoint(..., integrated_save=...)`` (gloo on CPU).

Each worker runs many checks in one process group (start-up of the ranks is
the slow part) and raises on the first failure; :func:`run` re-raises it in
the test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
import dist_workers  # noqa: E402 - the shared spawned-rank helpers (FSDP2 model, full())

KEY = bytes(range(16))


def run(fn_name: str, world: int, *args: Any) -> None:
    """Run ``fn_name(rank, world, *args)`` of this module on ``world`` spawned ranks."""
    dist_workers.run_in(__name__, fn_name, world, *args)


def _model_state(world: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An FSDP2 model's state dict (DTensors) and, on every rank, its full tensors."""
    model, opt = dist_workers.fsdp_model(world)
    dist_workers.train(model, opt, 0)
    sd = model.state_dict()
    from torch.distributed.tensor import DTensor

    assert all(isinstance(v, DTensor) for v in sd.values())
    return sd, dist_workers.full(sd)


def _same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert list(got) == list(expected), (list(got), list(expected))
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert type(got[k]) is torch.Tensor and torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


def integrated(rank: int, world: int, root: str) -> None:
    """True: rank 0 writes one ordinary file of full tensors; the others write nothing."""
    import safetensors.torch

    import torchaux

    sd, full = _model_state(world)
    # ckpt + CRC, synchronous; rank 1 passes its own name to prove it writes nothing.
    path = os.path.join(root, "full.ckpt" if rank == 0 else "rank1.ckpt")
    handle = torchaux.save_checkpoint(sd, path, append_dict={"step": 3}, crc_check=True)
    assert handle.done() and handle.wait() == os.path.join(root, "full.ckpt"), (handle, handle.wait())
    assert not os.path.exists(os.path.join(root, "rank1.ckpt"))
    dist.barrier()
    expected = {**full, "step": 3}
    on_disk = os.path.join(root, "full.ckpt")
    _same(torch.load(on_disk, weights_only=True), expected)
    _same(torchaux.load_checkpoint(on_disk, crc_check=True), expected)
    # safetensors + encryption + choice_func, async on every rank.
    enc = os.path.join(root, "full.safetensors")
    handle = torchaux.save_checkpoint(
        sd, enc, async_save=True, format="safetensors", enc_key=KEY, crc_check=True,
        choice_func=lambda name: not name.endswith("bias"),
    )
    assert handle.wait(60) == enc
    dist.barrier()
    kept = {k: v for k, v in full.items() if not k.endswith("bias")}
    _same(torchaux.load_checkpoint(enc, dec_key=KEY, crc_check=True), kept)
    # Unencrypted safetensors is readable by safetensors itself.
    st = os.path.join(root, "full2.safetensors")
    torchaux.save_checkpoint(sd, st, format="safetensors")
    dist.barrier()
    got = safetensors.torch.load_file(st)
    assert set(got) == set(full) and all(torch.equal(got[k], full[k]) for k in full)


def local(rank: int, world: int, root: str) -> None:
    """False: every rank writes its local shards (to_local()) to the name it passes."""
    import torchaux

    sd, full = _model_state(world)
    mine = os.path.join(root, f"rank{rank}.ckpt")
    torchaux.save_checkpoint(sd, mine, integrated_save=False, append_dict={"rank": rank})
    shards = {k: v.to_local() for k, v in sd.items()}
    _same(torch.load(mine, weights_only=True), {**shards, "rank": rank})
    _same(torchaux.load_checkpoint(mine), {**shards, "rank": rank})
    dist.barrier()
    # The two files together hold the full tensors (FSDP2 shards dim 0).
    other = torch.load(os.path.join(root, f"rank{1 - rank}.ckpt"), weights_only=True)
    parts = [torch.load(mine, weights_only=True), other][:: 1 if rank == 0 else -1]
    for k, v in full.items():
        assert torch.equal(torch.cat([p[k] for p in parts]), v), k
    # A plain state (no DTensor) is untouched by integrated_save: no collective, any rank alone.
    if rank == 1:  # a collective here would hang (pytest's timeout ends the test)
        torchaux.save_checkpoint({"w": torch.ones(3)}, os.path.join(root, "plain.ckpt"))
        assert torch.equal(torch.load(os.path.join(root, "plain.ckpt"))["w"], torch.ones(3))


class _FailingSink:
    """A sink whose write fails (injected ENOSPC), in the background."""

    def __call__(self, path: str) -> Any:
        raise OSError(28, "No space left on device (injected)")


def writer_fails(rank: int, world: int, root: str) -> None:
    """Rank 0's failure, before or during the write, reaches every rank; none hangs."""
    import torchaux
    from torchaux import _knobs
    from torchaux.errors import CheckpointError

    sd, _ = _model_state(world)
    with _knobs.override(distributed_timeout_s=60):
        # 1. Before the write: rank 0's directory does not exist (checked on the writer only).
        bad = os.path.join(root, "no-such-dir" if rank == 0 else "", "m.ckpt")
        try:
            torchaux.save_checkpoint(sd, bad)
        except ValueError as exc:
            assert rank == 0 and "does not exist" in str(exc), exc
        except CheckpointError as exc:
            assert rank == 1 and "rank 0" in str(exc) and "does not exist" in str(exc), exc
        else:
            raise AssertionError("a failed integrated save returned normally")
        # 2. In the background (async): the writer's sink fails.
        saver = torchaux.AsyncSaver(sink=_FailingSink()) if rank == 0 else None
        kwargs = {"saver": saver} if saver is not None else {}
        handle = torchaux.save_checkpoint(sd, os.path.join(root, "m.ckpt"), async_save=True, **kwargs)
        exc = handle.exception(60)
        assert isinstance(exc, OSError if rank == 0 else CheckpointError), repr(exc)
        assert "No space left" in str(exc), exc
        assert not os.path.exists(os.path.join(root, "m.ckpt"))
        if saver is not None:
            saver.close()
        # 3. After both failures the next integrated save still works (keys do not collide).
        ok = os.path.join(root, "ok.ckpt")
        assert torchaux.save_checkpoint(sd, ok).wait() == ok
    dist.barrier()
    assert set(torch.load(ok, weights_only=True)) == set(sd)
