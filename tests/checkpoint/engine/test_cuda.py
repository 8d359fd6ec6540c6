"""save_async on CUDA: side-stream copies into pinned buffers, stream-wait fences.

All tests here need a CUDA device and skip without one (CI has none; run them
with the device tool, see docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import torchaux
from torchaux.checkpoint.engine.saver import AsyncSaver

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def saver() -> AsyncSaver:
    s = AsyncSaver()
    yield s
    s.close()


def test_cuda_tensor_roundtrip_keeps_device_tag(tmp_path: Path, saver: AsyncSaver) -> None:
    """A CUDA tensor saves and loads back on cuda:0, bit-exact."""
    t = torch.randn(1024, device="cuda")
    path = os.path.join(tmp_path, "t.pt")
    torchaux.save_async(t, path, saver=saver).wait()
    loaded = torch.load(path, weights_only=True)
    assert loaded.device.type == "cuda" and torch.equal(loaded, t)


def test_mutation_queued_right_after_save_is_not_seen(tmp_path: Path, saver: AsyncSaver) -> None:
    """Kernels queued after the call cannot change the snapshot (stream-ordered fence)."""
    big = torch.ones(64 << 20, device="cuda")  # 256 MiB: the copy takes a while
    expected = big.clone()
    path = os.path.join(tmp_path, "big.pt")
    handle = torchaux.save_async({"big": big}, path, saver=saver)
    big.mul_(3)  # queued on the compute stream right away
    handle.wait()
    assert torch.equal(torch.load(path, weights_only=True)["big"], expected)


def test_save_is_ordered_after_pending_kernels(tmp_path: Path, saver: AsyncSaver) -> None:
    """Work queued before the call (e.g. optimizer.step) is in the file."""
    x = torch.zeros(32 << 20, device="cuda")
    for _ in range(20):
        x.add_(1)  # queued, likely not finished when save_async runs
    path = os.path.join(tmp_path, "x.pt")
    torchaux.save_async(x, path, saver=saver).wait()
    assert torch.all(torch.load(path, weights_only=True) == 20)


def test_staging_uses_pinned_buffers(tmp_path: Path, saver: AsyncSaver) -> None:
    """Device tensors are staged into pinned host memory (true async DMA)."""
    torchaux.save_async(torch.randn(1000, device="cuda"), os.path.join(tmp_path, "p.pt"),
                        saver=saver).wait()
    assert saver.pool.cached_bytes() == 4000
    buf = saver.pool.acquire(4000, pinned=True)
    assert buf.is_pinned()


def test_model_mode_training_files_equal_state_at_each_step(tmp_path: Path, saver: AsyncSaver) -> None:
    """The seed example on CUDA: every file equals the model state at its step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 1024), torch.nn.BatchNorm1d(1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    ).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    expected = []
    for step in range(5):
        x = torch.randn(256, 1024, device="cuda")
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        expected.append(copy.deepcopy({"model": model.state_dict(), "optim": optimizer.state_dict()}))
        state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        torchaux.save_async(state, os.path.join(tmp_path, f"s{step}.pt"), model=model, saver=saver)
    saver.wait()
    for step, ref in enumerate(expected):
        got = torch.load(os.path.join(tmp_path, f"s{step}.pt"), weights_only=True)
        for k, v in ref["model"].items():
            assert torch.equal(got["model"][k], v), (step, k)
        for pid, st in ref["optim"]["state"].items():
            for k, v in st.items():
                assert torch.equal(got["optim"]["state"][pid][k], v), (step, pid, k)
