"""Fences of save_async(model=...): which calls wait, bookkeeping, and no hooks left on the model."""

from __future__ import annotations

import copy
import io
import pathlib
import pickle
from collections.abc import Callable, Iterator

import pytest
import torch
from compare import assert_identical, load
from models import batch, bn_mlp, seed_mlp
from sinks import WAIT_S, background, busy_writer, still_running

import torchaux
from torchaux import AsyncSaver
from torchaux.checkpoint.engine import fence
from torchaux.checkpoint.engine.staging import HostBufferPool, Snapshot, stage

MakeSaver = Callable[..., AsyncSaver]

HOOK_DICTS = [
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
]


class FakeSnapshot:
    """Records which fence ran and what the world looked like at that moment."""

    def __init__(self, probe: Callable[[], object] = lambda: None) -> None:
        self.calls: list[tuple[str, object]] = []
        self.probe = probe

    def needs(self, tensors: object) -> tuple[int, bool]:
        return 1, False  # every module with tensors has a copy to wait for

    def fence_upto(self, n: int, *, devices: bool = True) -> None:
        self.calls.append(("forward", self.probe()))

    def fence_all(self) -> None:
        self.calls.append(("all", self.probe()))


@pytest.fixture
def armed() -> Iterator[Callable[[torch.nn.Module, FakeSnapshot], None]]:
    """arm() a fake snapshot on a model; always disarmed at teardown."""
    done: list[tuple[torch.nn.Module, FakeSnapshot]] = []

    def arm(model: torch.nn.Module, snap: FakeSnapshot) -> None:
        fence.arm(model, snap)  # type: ignore[arg-type]
        done.append((model, snap))

    yield arm
    for model, snap in done:
        fence.disarm(model, snap)  # type: ignore[arg-type]


# -- end to end -------------------------------------------------------------------------


def test_fence_is_armed_until_the_save_is_staged(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """A model= save arms one fence until staged; an eager save arms none."""
    model = seed_mlp()
    saver, sink, blocker = busy_writer(make_saver, tmp_path)
    assert fence.armed_count() == 0  # the eager blocker save armed nothing
    handle = torchaux.save_async(model.state_dict(), tmp_path / "m.pt", model=model, saver=saver)
    assert fence.armed_count() == 1
    sink.release()
    handle.wait(timeout=WAIT_S)  # staged (and its disarm callback) precede committed
    blocker.wait(timeout=WAIT_S)
    assert fence.armed_count() == 0


def test_model_carries_no_torchaux_hook(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """While fenced, the model holds only the root's load-state-dict fence; torch.save(model) and pickle work and keep user hooks."""
    model = bn_mlp()
    model.register_forward_hook(_user_hook)
    before = {name: {d: len(getattr(m, d)) for d in HOOK_DICTS} for name, m in model.named_modules()}
    saver, sink, blocker = busy_writer(make_saver, tmp_path)
    handle = torchaux.save_async(model.state_dict(), tmp_path / "m.pt", model=model, saver=saver)
    assert fence.armed_count() == 1
    after = {name: {d: len(getattr(m, d)) for d in HOOK_DICTS} for name, m in model.named_modules()}
    before[""]["_load_state_dict_pre_hooks"] += 1  # the load_state_dict fence, while armed only
    assert after == before
    assert list(model._forward_hooks.values()) == [_user_hook]
    buf = io.BytesIO()
    torch.save(model, buf)
    restored = pickle.loads(pickle.dumps(model))
    assert list(restored._forward_hooks.values()) == [_user_hook]
    assert_identical(load(buf.getvalue(), weights_only=False), model)
    sink.release()
    handle.wait(timeout=WAIT_S)
    blocker.wait(timeout=WAIT_S)
    before[""]["_load_state_dict_pre_hooks"] -= 1
    assert {name: {d: len(getattr(m, d)) for d in HOOK_DICTS} for name, m in model.named_modules()} == before


def _user_hook(module: torch.nn.Module, args: object, output: object) -> None:
    """A picklable user hook (module-level function)."""


def test_optimizer_step_is_fenced_for_an_eval_model_without_backward(
    make_saver: MakeSaver, tmp_path: pathlib.Path
) -> None:
    """An eval-mode model with no forward/backward still has optimizer.step fenced; the file has pre-step weights.

    The step does not wait for the busy writer: the fence copies on the training thread.
    """
    model = seed_mlp().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    saver, sink, blocker = busy_writer(make_saver, tmp_path)
    expected = copy.deepcopy(model.state_dict())
    handle = torchaux.save_async(model.state_dict(), tmp_path / "m.pt", model=model, saver=saver)
    background(opt.step).result(timeout=WAIT_S)  # never blocked behind the busy writer
    sink.release()
    handle.wait(timeout=WAIT_S)
    blocker.wait(timeout=WAIT_S)
    assert_identical(load(str(tmp_path / "m.pt")), expected)
    assert not torch.equal(model[0].weight, expected["0.weight"])


def test_other_models_are_not_fenced(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """The forward of a model that is not being saved runs while another model's save is staging."""
    model, other = seed_mlp(), seed_mlp()
    saver, sink, blocker = busy_writer(make_saver, tmp_path)
    handle = torchaux.save_async(model.state_dict(), tmp_path / "m.pt", model=model, saver=saver)
    out = background(other, batch(0)[0]).result(timeout=WAIT_S)
    assert out.shape == (8, 5)
    assert not handle.staged.done()
    sink.release()
    handle.wait(timeout=WAIT_S)
    blocker.wait(timeout=WAIT_S)


# -- hook semantics with a fake snapshot ------------------------------------------------------


def test_forward_calls_fence_forward_before_the_forward(armed: Callable[..., None]) -> None:
    """An armed model's forward runs fence_forward once, before any submodule runs; other modules run none."""
    model = seed_mlp()
    seen: list[str] = []
    model[0].register_forward_pre_hook(lambda m, a: seen.append("linear0"))
    snap = FakeSnapshot(probe=lambda: list(seen))
    armed(model, snap)
    other = torch.nn.Linear(100, 3)
    other(torch.randn(2, 100))
    assert snap.calls == []
    with torch.no_grad():
        model(torch.randn(2, 100))
    assert snap.calls[0] == ("forward", [])  # fenced before linear0 ran
    assert {kind for kind, _ in snap.calls} == {"forward"}


def test_backward_calls_fence_all_before_gradients_exist(armed: Callable[..., None]) -> None:
    """Backward through an armed model's output runs fence_all as each parameter gradient is accumulated."""
    model = seed_mlp()
    params = list(model.parameters())
    snap = FakeSnapshot(probe=lambda: [p.grad is None for p in params])
    armed(model, snap)
    loss = model(torch.randn(4, 100)).sum()
    snap.calls.clear()
    loss.backward()
    assert [kind for kind, _ in snap.calls] == ["all"] * len(params)
    assert all(p.grad is not None for p in params)


def test_any_optimizer_step_calls_fence_all_before_updating(armed: Callable[..., None]) -> None:
    """Every optimizer's step (even over unrelated parameters) runs fence_all before changing anything."""
    model = seed_mlp()
    unrelated = torch.nn.Parameter(torch.ones(3))
    unrelated.grad = torch.ones(3)
    snap = FakeSnapshot(probe=lambda: unrelated.detach().clone())
    armed(model, snap)
    torch.optim.SGD([unrelated], lr=1.0).step()
    assert len(snap.calls) == 1
    kind, value = snap.calls[0]
    assert kind == "all"
    assert torch.equal(value, torch.ones(3))  # probed before the update
    assert torch.equal(unrelated.detach(), torch.zeros(3))


def test_disarm_stops_fencing_and_ignores_a_stale_snapshot(armed: Callable[..., None]) -> None:
    """disarm() with another snapshot keeps the fence; with the armed one, nothing is fenced any more."""
    model = seed_mlp()
    snap = FakeSnapshot()
    armed(model, snap)
    fence.disarm(model, FakeSnapshot())  # type: ignore[arg-type]
    assert fence.armed_count() == 1
    fence.disarm(model, snap)  # type: ignore[arg-type]
    assert fence.armed_count() == 0
    model(torch.randn(2, 100)).sum().backward()
    p = torch.nn.Parameter(torch.ones(1))
    p.grad = torch.ones(1)
    torch.optim.SGD([p], lr=1.0).step()
    assert snap.calls == []


# -- torch.compile ----------------------------------------------------------------------------


def _staged_snapshot(model: torch.nn.Module) -> Snapshot:
    """A real model= snapshot whose copies are done (what a forward sees just before disarm)."""
    snap = stage(
        model.state_dict(),
        pool=HostBufferPool(),
        pickle_module=pickle,
        pickle_protocol=2,
        defer_cpu_copies=True,
        model_buffers=model.buffers(),
    )
    snap.finish_staging()
    return snap


@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)` when there are global hooks")
def test_arming_the_fence_never_recompiles_a_compiled_model() -> None:
    """Forwards of a torch.compile'd model while its fence is armed (then disarmed) trigger no recompilation."""
    from torch._dynamo.testing import CompileCounter

    model = seed_mlp()
    first = _staged_snapshot(model)
    fence.arm(model, first)  # installs the global hooks up front,
    fence.disarm(model, first)  # as any earlier model= save has
    torch._dynamo.reset()
    try:
        x = batch(0)[0]
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter)
        expected = model(x)
        assert torch.equal(compiled(x), expected)
        frames = counter.frame_count
        for _ in range(3):
            snap = _staged_snapshot(model)
            fence.arm(model, snap)
            try:
                assert torch.equal(compiled(x), expected)
            finally:
                fence.disarm(model, snap)
            assert torch.equal(compiled(x), expected)
        assert counter.frame_count == frames
    finally:
        torch._dynamo.reset()
