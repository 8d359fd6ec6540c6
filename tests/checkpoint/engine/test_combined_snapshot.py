"""Combined parameters stage their own bytes once: no tensor drags the flat buffer along.

Since each combined tensor has a storage of its own size (aliasing the flat
buffer, issue #17 item 4), a whole-model save writes every parameter's bytes
once — the flat buffer's bytes in total — and saving one parameter writes
that parameter only.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

import torchaux
from torchaux.checkpoint.engine import staging


def test_combined_parameters_stage_their_bytes_once() -> None:
    """After combine_tensors, a model's state dict stages one record per parameter, flat bytes in all."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    params = list(model.parameters())
    flat = torchaux.combine_tensors(params)
    assert flat is not None
    snap = staging.stage(model.state_dict(), pool=staging.HostBufferPool(),
                         pickle_module=pickle, pickle_protocol=2)
    snap.finish_staging()
    records = snap.records()
    assert len(records) == len(params)
    assert sum(r[1].nbytes() for r in records) == sum(p.numel() * p.element_size() for p in params)
    assert sum(r[1].nbytes() for r in records) <= flat.untyped_storage().nbytes()


def test_combined_state_round_trips_after_training_step(tmp_path: Path) -> None:
    """Saving combined parameters keeps every value; the file holds the parameters' bytes once."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    flat = torchaux.combine_tensors(list(model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "combined.pt"
    torchaux.save_async(model.state_dict(), path).wait()
    loaded = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    one = tmp_path / "bias.pt"
    torchaux.save_async(model[1].bias, one).wait()
    assert os.path.getsize(one) < os.path.getsize(path) - flat.untyped_storage().nbytes() // 2
