"""A combined parameter buffer is snapshotted by save_async in one copy."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

import torchaux
from torchaux.checkpoint.engine import staging


def test_combined_parameters_stage_as_one_record() -> None:
    """After combine_tensors, a model's state dict stages as a single storage copy."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    params = list(model.parameters())
    flat = torchaux.combine_tensors(params)
    assert flat is not None
    snap = staging.stage(model.state_dict(), pool=staging.HostBufferPool(),
                         pickle_module=pickle, pickle_protocol=2)
    snap.finish_staging()
    records = snap.records()
    assert len(records) == 1
    assert records[0][1].nbytes() == flat.untyped_storage().nbytes()


def test_combined_state_round_trips_after_training_step(tmp_path: Path) -> None:
    """Saving combined parameters keeps every tensor's values and the shared storage."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    torchaux.combine_tensors(list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "combined.pt"
    torchaux.save_async(model.state_dict(), path).wait()
    loaded = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    ptrs = {t.untyped_storage().data_ptr() for t in loaded.values()}
    assert len(ptrs) == 1
