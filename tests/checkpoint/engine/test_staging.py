"""Staging: host buffer pool, snapshot semantics (eager and deferred), storage checks."""

from __future__ import annotations

import io
import os
import pathlib
import pickle

import pytest
import torch

from torchaux.errors import TensorChangedError
from compare import assert_identical, load, raw_bytes
from sinks import WAIT_S, background, still_running

import torchaux
from torchaux import AsyncSaver
from torchaux.checkpoint.engine.staging import HostBufferPool, Snapshot, stage


def snapshot_bytes(snap: Snapshot) -> dict[str, bytes]:
    return {key: raw_bytes(buf) for key, buf in snap.records()}


def do_stage(obj: object, pool: HostBufferPool, **kwargs: object) -> Snapshot:
    return stage(obj, pool=pool, pickle_module=pickle, pickle_protocol=2, **kwargs)  # type: ignore[arg-type]


# -- HostBufferPool -------------------------------------------------------------------


def test_pool_returns_released_buffer_for_the_same_size() -> None:
    """A released buffer is handed out again for the same byte size, never for another size."""
    pool = HostBufferPool(cache_bytes=1 << 20)  # room for both sizes (the automatic bound would evict)
    a = pool.acquire(64, pinned=False)
    assert a.nbytes() == 64
    pool.release([a])
    assert pool.cached_bytes() == 64
    b = pool.acquire(32, pinned=False)
    assert b is not a and b.nbytes() == 32
    assert pool.acquire(64, pinned=False) is a
    assert pool.cached_bytes() == 0


def test_pool_cached_bytes_and_clear() -> None:
    """cached_bytes sums every free buffer; clear() drops them all."""
    pool = HostBufferPool()
    bufs = [pool.acquire(n, pinned=False) for n in (10, 10, 1000, 0)]
    pool.release(bufs)
    assert pool.cached_bytes() == 1020
    assert pool.acquire(10, pinned=False) in bufs
    pool.clear()
    assert pool.cached_bytes() == 0
    assert all(pool.acquire(10, pinned=False) is not b for b in bufs)


# -- snapshot values ------------------------------------------------------------------


def test_eager_snapshot_keeps_values_at_call() -> None:
    """stage() copies right away: in-place mutations after the call do not reach the snapshot."""
    pool = HostBufferPool()
    obj = {"w": torch.arange(6.0), "i": torch.arange(4, dtype=torch.int32)}
    expected = {"0": raw_bytes(obj["w"].untyped_storage()), "1": raw_bytes(obj["i"].untyped_storage())}
    snap = do_stage(obj, pool)
    obj["w"].mul_(-1)
    obj["i"].fill_(7)
    snap.finish_staging()
    assert snapshot_bytes(snap) == expected
    assert snap.nbytes == 6 * 4 + 4 * 4


def test_deferred_snapshot_fails_when_a_tensor_changes_before_its_copy() -> None:
    """An unfenced in-place update between a deferred call and its copy fails the save, naming the tensor."""
    pool = HostBufferPool()
    w = torch.arange(6.0)
    snap = do_stage({"w": w}, pool, defer_cpu_copies=True)
    assert not snap.is_staged()
    w.add_(100)  # unfenced: the copy would mix values
    with pytest.raises(TensorChangedError, match="'w' was modified in place.*eager mode"):
        snap.finish_staging()
    assert snap.is_staged()  # fences are open


def test_deferred_snapshot_after_copy_is_unaffected() -> None:
    """A change after the deferred copy does not reach the snapshot and is not an error."""
    pool = HostBufferPool()
    w = torch.arange(6.0)
    expected = raw_bytes(w.untyped_storage())
    snap = do_stage({"w": w}, pool, defer_cpu_copies=True)
    snap.finish_staging()
    w.add_(100)
    assert snapshot_bytes(snap) == {"0": expected}


def test_records_follow_first_appearance_and_dedupe_shared_storage() -> None:
    """One record per distinct storage, keyed '0', '1', ... in first-appearance order."""
    pool = HostBufferPool()
    a, b = torch.arange(4.0), torch.arange(3, dtype=torch.int64)
    snap = do_stage({"b": b, "a": a, "a_view": a[1:], "b_again": b.view(3, 1)}, pool)
    snap.finish_staging()
    assert snapshot_bytes(snap) == {"0": raw_bytes(b.untyped_storage()), "1": raw_bytes(a.untyped_storage())}


def test_release_returns_every_buffer_to_the_pool() -> None:
    """Snapshot.release gives all staged buffers back and empties the snapshot."""
    pool = HostBufferPool()
    snap = do_stage({"a": torch.zeros(10), "b": torch.zeros(3, dtype=torch.int8)}, pool)
    snap.finish_staging()
    assert pool.cached_bytes() == 0
    snap.release(pool)
    assert pool.cached_bytes() == 43
    assert snap.records() == []


def test_fences_copy_on_the_calling_thread_without_the_writer() -> None:
    """fence_forward and fence_all copy pending deferred records themselves: they never wait for finish_staging."""
    pool = HostBufferPool()
    w = torch.arange(5.0)
    expected = raw_bytes(w.untyped_storage())
    snap = do_stage({"w": w}, pool, defer_cpu_copies=True)
    background(snap.fence_forward).result(timeout=WAIT_S)
    background(snap.fence_all).result(timeout=WAIT_S)
    w.add_(1)  # after the fence: allowed, and not in the snapshot
    snap.finish_staging()
    assert snapshot_bytes(snap) == {"0": expected}


def test_model_buffer_storages_are_marked_for_early_copy() -> None:
    """Exactly the storages of model_buffers (BatchNorm statistics) are flagged to be copied first."""
    pool = HostBufferPool()
    bn = torch.nn.BatchNorm1d(3)
    # state_dict order: weight, bias, running_mean, running_var, num_batches_tracked -> keys 0..4
    snap = do_stage(
        {"bn": bn.state_dict(), "w": torch.arange(5.0)},
        pool,
        defer_cpu_copies=True,
        model_buffers=bn.buffers(),
    )
    snap.finish_staging()
    assert sorted(r.key for r in snap._records if r.is_buffer) == ["2", "3", "4"]


def test_failed_deferred_copy_still_opens_the_fences() -> None:
    """If a deferred copy fails, finish_staging raises but the fences open (no training deadlock)."""
    pool = HostBufferPool()
    w = torch.arange(1000.0)
    snap = do_stage({"w": w}, pool, defer_cpu_copies=True)
    w.untyped_storage().resize_(0)  # the copy source shrinks under the snapshot
    with pytest.raises(RuntimeError):
        snap.finish_staging()
    assert snap.is_staged()
    background(snap.fence_all).result(timeout=WAIT_S)
    background(snap.fence_forward).result(timeout=WAIT_S)


# -- checks done at staging time ------------------------------------------------------


def test_meta_storage_is_rejected_before_anything_is_written(saver: AsyncSaver, tmp_path: pathlib.Path) -> None:
    """A meta storage (no data) raises ValueError in the caller; no file, no buffer taken."""
    obj = {"s": torch.empty(3, device="meta").untyped_storage(), "ok": torch.ones(2)}
    with pytest.raises(ValueError, match="meta"):
        torchaux.save_async(obj, tmp_path / "ckpt.pt", saver=saver)
    assert os.listdir(tmp_path) == []
    assert saver.pool.cached_bytes() == 0
    with pytest.raises(NotImplementedError):
        torch.save(obj, io.BytesIO())  # torch.save cannot save it either


def test_same_storage_as_two_dtypes_raises_like_torch_save(saver: AsyncSaver, tmp_path: pathlib.Path) -> None:
    """Two tensors viewing one storage as different dtypes raise torch.save's RuntimeError; nothing is written."""
    base = torch.arange(8, dtype=torch.float32)
    obj = {"f": base, "i": base.view(torch.int32)}
    with pytest.raises(RuntimeError) as reference:
        torch.save(obj, io.BytesIO())
    with pytest.raises(RuntimeError) as info:
        torchaux.save_async(obj, tmp_path / "ckpt.pt", saver=saver)
    assert str(info.value) == str(reference.value)
    assert os.listdir(tmp_path) == []
    # the saver is still usable: its slot was given back
    handle = torchaux.save_async({"f": base}, tmp_path / "ok.pt", saver=saver)
    assert handle.wait(timeout=WAIT_S) == str(tmp_path / "ok.pt")
    assert_identical(load(str(tmp_path / "ok.pt")), {"f": base})


def test_device_module_resolves_every_backend_torch_knows() -> None:
    """The accelerator path's module lookup works without an accelerator (it once named no torch API)."""
    from torchaux.checkpoint.engine.staging.copies import device_module

    assert device_module(torch.device("cpu")) is torch.cpu
    assert device_module(torch.device("cuda")) is torch.cuda  # the module exists without a GPU
