"""save_files: several files of one checkpoint, one writer job, copies deferred under the model's fences."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchaux import AsyncSaver, save_async
from torchaux.checkpoint.engine import fence
from torchaux.checkpoint.engine.staging import fence_blocked_seconds
from torchaux.errors import TensorChangedError
from torchaux.integrations.staged_files import StagedFile, save_files


class _GatedSink:
    """The default commit; a file named ``blocker*`` waits for ``go`` (the writer is held)."""

    def __init__(self) -> None:
        from torchaux.checkpoint.storage.commit import atomic_write

        self.go, self.entered, self._inner = threading.Event(), threading.Event(), atomic_write

    def __call__(self, path: str):  # type: ignore[no-untyped-def]
        if Path(path).name.startswith("blocker"):
            self.entered.set()
            assert self.go.wait(60)
        return self._inner(path)


def _held_saver(tmp_path: Path) -> tuple[AsyncSaver, _GatedSink, object]:
    """A saver whose writer is busy with a blocked save, so the next job's copies wait."""
    sink = _GatedSink()
    saver = AsyncSaver(sink=sink, max_pending=2)
    blocker = save_async(torch.zeros(1), str(tmp_path / "blocker.pt"), saver=saver)
    assert sink.entered.wait(60)
    return saver, sink, blocker


def _files(tmp_path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[StagedFile]:
    return [
        StagedFile(str(tmp_path / "model.safetensors"), dict(model.state_dict()), "safetensors",
                   defer="model"),
        StagedFile(str(tmp_path / "optimizer.pt"), opt.state_dict(), "torch", defer="optimizer"),
        StagedFile(str(tmp_path / "extra.pt"), {"step": 7, "t": torch.arange(3)}, "torch"),
    ]


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_files_hold_the_values_at_the_call_across_a_training_step(tmp_path: Path) -> None:
    """The writer is held before it copies; the next step's fences copy, so the files are the old state."""
    model, opt = _trained()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = opt.state_dict()["state"][0]["exp_avg"].clone()
    saver, sink, blocker = _held_saver(tmp_path)
    try:
        handle = save_files(_files(tmp_path, model, opt), saver=saver, model=model)
        assert fence.armed_count() == 2  # the two deferred files; extra.pt was copied at the call
        blocked = fence_blocked_seconds()
        model(torch.randn(4, 8)).sum().backward()  # gradient accumulation: the weights' fence
        after_backward = fence_blocked_seconds()
        opt.step()  # the optimizer state's fence: copied before the step changes it
        after_step = fence_blocked_seconds()
    finally:
        sink.go.set()
    handle.wait()
    assert after_backward > blocked  # the training thread copied the weights itself ...
    assert after_step > after_backward  # ... and the optimizer state only at the step
    assert not torch.equal(model[0].weight, weights["0.weight"])
    blocker.wait()  # type: ignore[attr-defined]
    saver.close()
    assert fence.armed_count() == 0 and not fence.hooks_installed()
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(on_disk[k], v) for k, v in weights.items())
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert torch.equal(saved["state"][0]["exp_avg"], moments)
    assert torch.load(tmp_path / "extra.pt", weights_only=True)["step"] == 7


def test_unfenced_change_fails_the_save_and_writes_nothing(tmp_path: Path) -> None:
    """An in-place change the fences do not order (a raw add_) is caught: TensorChangedError, no file."""
    model, opt = _trained()
    saver, sink, _ = _held_saver(tmp_path)
    try:
        handle = save_files(_files(tmp_path, model, opt), saver=saver, model=model)
        with torch.no_grad():
            model[1].bias.add_(1.0)  # not through forward/backward/step: the version check sees it
    finally:
        sink.go.set()
    with pytest.raises(TensorChangedError):
        handle.wait()
    saver.close()
    assert fence.armed_count() == 0
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "optimizer.pt").exists()


def test_without_model_everything_is_copied_at_the_call(tmp_path: Path) -> None:
    """No model: nothing is armed and later changes never reach the files."""
    model, opt = _trained()
    before = model[0].weight.clone()
    saver = AsyncSaver()
    handle = save_files(_files(tmp_path, model, opt), saver=saver)
    assert fence.armed_count() == 0
    with torch.no_grad():
        model[0].weight.add_(1.0)
    handle.wait()
    saver.close()
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["0.weight"], before)


def test_bad_entries_are_refused_before_anything_is_staged(tmp_path: Path) -> None:
    """A non-tensor safetensors entry and an unknown format raise at the call; the saver stays usable."""
    saver = AsyncSaver()
    with pytest.raises(TypeError):
        save_files([StagedFile(str(tmp_path / "m.safetensors"), {"w": 3}, "safetensors")],
                   saver=saver)
    with pytest.raises(ValueError, match="format"):
        save_files([StagedFile(str(tmp_path / "m.bin"), {}, "pickle")], saver=saver)  # type: ignore[arg-type]
    save_files([StagedFile(str(tmp_path / "ok.pt"), {"a": 1}, "torch")], saver=saver).wait()
    saver.close()
    assert torch.load(tmp_path / "ok.pt") == {"a": 1}
