"""Spawned-rank workers of test_dist_s3.py: torchaux.distributed on the local S3 server (moto).

The ranks reach the test process's moto server through the ``storage_options``
passed as arguments (endpoint URL, fake credentials).  The model, its state
dict and the comparisons are dist_workers.py's.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

import dist_workers
from dist_workers import assert_same, fresh_state, fsdp_model, full, load_and_check, train

KEY = bytes(range(32))
MIB = 1 << 20


def run(fn_name: str, world: int, *args: Any) -> None:
    """Run ``fn_name(rank, world, *args)`` of this module on ``world`` spawned ranks."""
    dist_workers.run_in(__name__, fn_name, world, *args)


def _expect(kind: type[BaseException], fn: Any, *args: Any, **kwargs: Any) -> BaseException:
    try:
        fn(*args, **kwargs)
    except kind as exc:
        return exc
    raise AssertionError(f"{fn} did not raise {kind.__name__} on rank {dist.get_rank()}")


def _tensors(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: sd[k] for k in ("model", "optim", "rep", "tp")}


def contract(rank: int, world: int, base: str, options: dict[str, Any], root: str) -> None:
    """Round trip, overwrite, stock DCP both ways and encryption, all on S3."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    import torchaux.distributed as td
    from torchaux.errors import DecryptionError

    model, opt = fsdp_model(world)
    for step in range(2):
        train(model, opt, step)
    url = f"{base}/plain"
    assert td.save(dist_workers.state(model, opt, world, step=1), url, storage_options=options,
                   timeout=60) == url
    train(model, opt, 2)
    sd = dist_workers.state(model, opt, world, step=2)
    expected = full(sd)
    handle = td.save_async(sd, url + "/", storage_options=options, timeout=60)  # over the first
    train(model, opt, step=7)  # the snapshot was taken at the call
    with torch.no_grad():
        sd["rep"].add_(100)
    assert handle.wait(60) == url
    expected_path = os.path.join(root, "expected.pt")
    if rank == 0:
        torch.save(expected, expected_path)
    dist.barrier()
    load_and_check(world, url, expected_path, storage_options=options)

    # stock FsspecReader reads ours; ours reads stock FsspecWriter's
    _, _, sd2 = fresh_state(world)
    dcp.load(sd2, storage_reader=FsspecReader(url, **options))
    assert_same(_tensors(expected), _tensors(full(sd2)))
    now = dist_workers.state(model, opt, world, step=3)  # the model after step 7
    now_path = os.path.join(root, "now.pt")
    now_full = full(now)
    if rank == 0:
        torch.save(now_full, now_path)
    dist.barrier()
    stock = f"{base}/stock"
    dcp.save(now, storage_writer=FsspecWriter(stock, **options))
    load_and_check(world, stock, now_path, storage_options=options)

    # encryption: round trip; a wrong key and no key are refused
    enc = f"{base}/enc"
    td.save(now, enc, storage_options=options, enc_key=KEY, timeout=60)
    load_and_check(world, enc, now_path, storage_options=options, dec_key=KEY)
    _, _, sd3 = fresh_state(world)
    exc = _expect(DecryptionError, td.load, sd3, enc, storage_options=options, dec_key=bytes(32))
    assert "wrong key" in str(exc), exc
    exc = _expect(DecryptionError, td.load, sd3, enc, storage_options=options)
    assert "pass dec_key" in str(exc), exc


def failing_rank(rank: int, world: int, base: str, options: dict[str, Any]) -> None:
    """Rank 1's upload fails after its first part, then rank 0's write: nothing committed or left."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import torchaux.distributed as td
    from torchaux import _knobs
    from torchaux.distributed.writer import StorageWriter
    from torchaux.errors import CheckpointError

    url = f"{base}/fail"
    mesh = init_device_mesh("cpu", (world,))

    def state(step: int) -> dict[str, Any]:
        # 6 MiB per rank in the first chunk: more than one 5 MiB part
        big = distribute_tensor(torch.full((world * 3 * MIB // 2,), float(step)), mesh, [Shard(0)])
        return {"big": big, "small": torch.full((4,), float(step)), "step": step}

    original_file = StorageWriter._write_rank_file
    with _knobs.override(upload_part_bytes=5 * MIB):
        td.save(state(1), url, storage_options=options, timeout=60)
        original = StorageWriter._write_chunk
        if rank == 1:
            def broken(self: Any, out: Any, data: Any) -> None:
                original(self, out, data)
                if out.tell() > 5 * MIB:  # the upload's first part is sent: fail now
                    raise OSError(28, "No space left on device (injected)")

            StorageWriter._write_chunk = broken  # type: ignore[method-assign]
        try:
            exc = _expect((CheckpointError, OSError), td.save, state(2), url,  # type: ignore[arg-type]
                          storage_options=options, timeout=60)
        finally:
            StorageWriter._write_chunk = original  # type: ignore[method-assign]
    assert "No space left" in str(exc), (rank, exc)  # rank 0 names rank 1's cause
    dist.barrier()
    out = td.load_full(url, storage_options=options)
    assert out["step"] == 1 and torch.equal(out["big"], torch.full((world * 3 * MIB // 2,), 1.0))

    # The coordinator's own write fails: the others hear its cause at once (they
    # wait for the outcome, not for the timeout), and nothing is committed.
    if rank == 0:
        def refused(self: Any, *args: Any, **kwargs: Any) -> Any:
            raise OSError(5, "Input/output error (injected on the coordinator)")

        StorageWriter._write_rank_file = refused  # type: ignore[method-assign]
    try:
        exc = _expect((CheckpointError, OSError), td.save, state(3), url,  # type: ignore[arg-type]
                      storage_options=options, timeout=600)
    finally:
        StorageWriter._write_rank_file = original_file  # type: ignore[method-assign]
    assert "injected on the coordinator" in str(exc), (rank, exc)
    dist.barrier()
    assert td.load_full(url, storage_options=options)["step"] == 1


KILL_NUMEL = 3 * MIB // 2  # 6 MiB of float32 per rank: two parts of 5 MiB each


def kill_state(step: int, mesh: Any) -> dict[str, Any]:
    """Every value derives from ``step`` (a torn checkpoint shows as mixed steps); no collective."""
    from torch.distributed.tensor import DTensor, Shard

    local = torch.full((KILL_NUMEL,), float(step))
    sharded = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    return {"sharded": sharded, "replicated": torch.full((1000,), float(step)), "step": step}


def kill_loop(
    rank: int, world: int, port: int, url: str, options: dict[str, Any], queue: Any, timeout: float
) -> None:
    """Save steps 0, 1, 2, ... to ``url`` in 5 MiB parts until a save fails; report on ``queue``."""
    import time

    from torch.distributed.device_mesh import init_device_mesh

    import torchaux.distributed as td
    from torchaux import _knobs

    dist_workers.init(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    step = 0
    with _knobs.override(upload_part_bytes=5 * MIB):
        while True:
            start = time.monotonic()
            try:
                td.save(kill_state(step, mesh), url, storage_options=options, timeout=timeout)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                dist_workers.report_exc(queue, exc, time.monotonic() - start)
                queue.close()
                queue.join_thread()  # flush the report before the hard exit
                os._exit(0)  # the group is broken: no destroy_process_group (it would hang)
            queue.put(("ok", rank, step))
            step += 1
