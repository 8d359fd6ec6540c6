"""The file holds the object exactly as it was at the call, whatever the caller does next."""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable

import torch
from compare import assert_identical, load
from models import batch, bn_mlp, seed_mlp, train_step
from sinks import WAIT_S, GatedSink, background, busy_writer, still_running

import torchaux
from torchaux import AsyncSaver, SaveHandle

MakeSaver = Callable[..., AsyncSaver]


def test_in_place_mutation_after_the_call_is_not_saved(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """Eager mode: tensors mutated in place right after save_async returns are saved with their old values."""
    sink = GatedSink()  # the writer cannot touch the file until we have mutated everything
    saver = make_saver(sink=sink)
    base = torch.arange(10.0)
    obj = {"w": torch.randn(1000), "i": torch.arange(10), "view": base[2:5], "base": base}
    expected = copy.deepcopy(obj)
    handle = torchaux.save_async(obj, tmp_path / "ckpt.pt", saver=saver)
    obj["w"].add_(1)
    obj["i"].zero_()
    obj["view"].fill_(-1)  # also changes base through the shared storage
    sink.release()
    handle.wait(timeout=WAIT_S)
    loaded = load(str(tmp_path / "ckpt.pt"))
    assert_identical(loaded, expected)
    assert not torch.equal(loaded["w"], obj["w"])  # the mutation really happened


def test_python_values_changed_after_the_call_are_not_saved(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """Step counters, floats, lists and nested dicts changed after the call keep their old values in the file."""
    sink = GatedSink()
    saver = make_saver(sink=sink)
    obj = {"step": 5, "lr": 0.1, "history": [1.0, 2.0], "cfg": {"epochs": 3}, "w": torch.ones(2)}
    expected = copy.deepcopy(obj)
    handle = torchaux.save_async(obj, tmp_path / "ckpt.pt", saver=saver)
    obj["step"] = 6
    obj["lr"] *= 0.5
    obj["history"].append(3.0)
    obj["cfg"]["epochs"] = 4
    obj["new"] = "key"
    sink.release()
    handle.wait(timeout=WAIT_S)
    assert_identical(load(str(tmp_path / "ckpt.pt")), expected)


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_training_loop_with_model_saves_exact_weights_every_step(saver: AsyncSaver, tmp_path: pathlib.Path) -> None:
    """model= mode, seed example (MLP, SGD): each step's file equals a deepcopy of state_dict taken at the call."""
    model = seed_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    expected: list[dict[str, torch.Tensor]] = []
    handles: list[SaveHandle] = []
    for step in range(6):
        train_step(model, opt, step)
        handles.append(torchaux.save_async(model, tmp_path / f"step{step}.pt", model=model, saver=saver))
        expected.append(copy.deepcopy(model.state_dict()))
    for step, handle in enumerate(handles):
        assert handle.wait(timeout=WAIT_S) == str(tmp_path / f"step{step}.pt")
        loaded = load(str(tmp_path / f"step{step}.pt"), weights_only=False)
        assert type(loaded) is type(model)
        assert_identical(loaded.state_dict(), expected[step], f"step{step}")
    assert all(_differs(expected[i], expected[i + 1]) for i in range(5))  # training changed the weights


def test_training_loop_with_batchnorm_and_adam_saves_exact_state(saver: AsyncSaver, tmp_path: pathlib.Path) -> None:
    """model= mode with BatchNorm (forward mutates buffers) and Adam state: every file equals its deepcopy."""
    model = bn_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    expected = []
    handles = []
    for step in range(5):
        train_step(model, opt, step)
        obj = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
        handles.append(torchaux.save_async(obj, tmp_path / f"step{step}.pt", model=model, saver=saver))
        expected.append(copy.deepcopy(obj))
    for step, handle in enumerate(handles):
        handle.wait(timeout=WAIT_S)
        assert_identical(load(str(tmp_path / f"step{step}.pt")), expected[step], f"step{step}")
    assert _differs(expected[0]["model"], expected[1]["model"])
    assert not torch.equal(expected[0]["model"]["1.running_mean"], expected[1]["model"]["1.running_mean"])


def test_optimizer_step_waits_until_the_model_save_is_staged(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """optimizer.step() during a model= save behind a busy writer copies first (never waits): the file has pre-step weights."""
    model = seed_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()  # grads ready before the save
    saver, sink, blocker = busy_writer(make_saver, tmp_path)
    expected = copy.deepcopy(model.state_dict())
    handle = torchaux.save_async(model.state_dict(), tmp_path / "m.pt", model=model, saver=saver)
    assert not handle.staged.done()  # model= returns before any copy
    background(opt.step).result(timeout=WAIT_S)  # not blocked behind the busy writer
    sink.release()
    handle.wait(timeout=WAIT_S)
    blocker.wait(timeout=WAIT_S)
    assert_identical(load(str(tmp_path / "m.pt")), expected)
    assert _differs(model.state_dict(), expected)  # the step did run afterwards


def test_forward_waits_until_model_buffers_are_staged(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """A BatchNorm forward during a model= save copies its module's tensors first: the file has pre-forward running stats."""
    model = bn_mlp()
    saver, sink, blocker = busy_writer(make_saver, tmp_path)
    expected = copy.deepcopy(model.state_dict())
    handle = torchaux.save_async(model.state_dict(), tmp_path / "m.pt", model=model, saver=saver)
    forward = background(model, batch(1)[0])
    forward.result(timeout=WAIT_S)  # not blocked behind the busy writer
    sink.release()
    forward.result(timeout=WAIT_S)
    handle.wait(timeout=WAIT_S)
    blocker.wait(timeout=WAIT_S)
    assert_identical(load(str(tmp_path / "m.pt")), expected)
    assert not torch.equal(model[1].running_mean, expected["1.running_mean"])


def test_eager_save_does_not_block_training(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """Without model=, the snapshot is complete at return: forward and step run while the writer is stuck."""
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    saver, sink, blocker = busy_writer(make_saver, tmp_path)
    expected = copy.deepcopy(model.state_dict())
    handle = torchaux.save_async(model.state_dict(), tmp_path / "m.pt", saver=saver)
    background(train_step, model, opt, 0).result(timeout=WAIT_S)  # completes with the gate closed
    assert not handle.done()
    sink.release()
    handle.wait(timeout=WAIT_S)
    blocker.wait(timeout=WAIT_S)
    assert_identical(load(str(tmp_path / "m.pt")), expected)
    assert _differs(model.state_dict(), expected)
