"""register_async_weights with the real accelerate.Accelerator (tiny model on CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("accelerate", reason="accelerate not installed: pip install 'torchaux[hf]'")

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import ProjectConfiguration  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sinks import FailingSink, GatedSink  # noqa: E402
from torchaux import AsyncSaver  # noqa: E402
from torchaux.checkpoint.engine import fence  # noqa: E402
from torchaux.integrations.accelerate import register_async_weights  # noqa: E402


class _Net(torch.nn.Module):
    """Two layers, the output tied to the input embedding (a shared storage, as in LMs)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.hidden = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 16, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.emb(x))))


_DATA = torch.randint(0, 16, (8, 4, 6), generator=torch.Generator().manual_seed(0))


def _setup(**config: Any) -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(**config) if config else None)
    model = _Net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    model, opt, sched = acc.prepare(model, opt, sched)
    return acc, model, opt, sched


def _step(acc: Accelerator, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
          i: int) -> float:
    x = _DATA[i]
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    acc.backward(loss)
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()


def test_save_state_returns_before_the_weights_and_resume_matches(tmp_path: Path) -> None:
    """The weights of the save's moment reach model.safetensors; load_state resumes the same loss curve."""
    acc, model, opt, sched = _setup()
    saves = register_async_weights(acc)
    full = [_step(acc, model, opt, sched, i) for i in range(2)]
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    acc.save_state(str(tmp_path / "ckpt"))
    full += [_step(acc, model, opt, sched, i) for i in range(2, 5)]  # fenced: the copies come first
    saves.wait()
    assert fence.armed_count() == 0
    ckpt = tmp_path / "ckpt"
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin"} <= {p.name for p in ckpt.iterdir()}
    on_disk = load_file(str(ckpt / "model.safetensors"))
    assert "out.weight" not in on_disk or "emb.weight" not in on_disk  # one name per shared storage
    assert all(torch.equal(on_disk[k], at_save[k]) for k in on_disk)

    acc2, model2, opt2, sched2 = _setup()
    saves2 = register_async_weights(acc2)
    acc2.load_state(str(ckpt))
    resumed = [_step(acc2, model2, opt2, sched2, i) for i in range(2, 5)]
    assert resumed == full[2:]
    saves.remove()
    saves2.remove()


def test_load_state_waits_for_weights_still_being_written(tmp_path: Path) -> None:
    """While the weights' write is held, the file is absent; load_state of that folder waits for it."""
    acc, model, opt, sched = _setup()
    sink = GatedSink()
    # Registered first, so it runs first: lets the held write go once load_state starts.
    acc.register_load_state_pre_hook(lambda models, input_dir: sink.release())
    saves = register_async_weights(acc, saver=AsyncSaver(sink=sink))
    _step(acc, model, opt, sched, 0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    acc.save_state(str(tmp_path / "ckpt"))
    assert sink.entered.wait(60)
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()  # save_state did not wait
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # load_state must bring the saved values back
    acc.load_state(str(tmp_path / "ckpt"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    saves.remove()


def test_a_failed_weights_write_is_raised_by_the_next_save(tmp_path: Path) -> None:
    """A background failure is raised, as the original exception, by the next save_state."""
    acc, model, opt, sched = _setup()
    sink = FailingSink(fail_after=10)
    saves = register_async_weights(acc, saver=AsyncSaver(sink=sink))
    _step(acc, model, opt, sched, 0)
    acc.save_state(str(tmp_path / "a"))
    with pytest.raises(OSError) as info:
        acc.save_state(str(tmp_path / "b"))
    assert info.value is sink.raised[0]
    assert not (tmp_path / "a" / "model.safetensors").exists()
    saves.remove()


def test_pickle_serialization_and_remove(tmp_path: Path) -> None:
    """safe_serialization=False writes pytorch_model.bin; after remove() accelerate writes the weights itself."""
    acc, model, opt, sched = _setup()
    saves = register_async_weights(acc, safe_serialization=False)
    _step(acc, model, opt, sched, 0)
    acc.save_state(str(tmp_path / "bin"), safe_serialization=False)
    saves.wait()
    state = torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    saves.remove()
    acc.save_state(str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "model.safetensors").exists()  # written synchronously again


def test_configurations_it_cannot_keep_correct_are_refused() -> None:
    """total_limit=1 with automatic naming, and non-Accelerator arguments, are refused with the fix named."""
    acc, *_ = _setup(automatic_checkpoint_naming=True, total_limit=1)
    with pytest.raises(ValueError, match="total_limit=2"):
        register_async_weights(acc)
    with pytest.raises(TypeError, match="Accelerator"):
        register_async_weights(object())
    with pytest.raises(TypeError, match="safe_serialization"):
        register_async_weights(Accelerator(cpu=True), safe_serialization="yes")  # type: ignore[arg-type]
