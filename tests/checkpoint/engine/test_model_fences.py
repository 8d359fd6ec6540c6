"""save_async(model=) never writes a mixed file: the engine-review cases, each against a busy writer."""

from __future__ import annotations

import io
import pathlib
import sys
import zipfile
from collections.abc import Callable

import pytest
import torch
from sinks import WAIT_S, background, busy_writer

import torchaux
from torchaux import AsyncSaver
from torchaux.checkpoint.engine import fence
from torchaux.errors import InvalidArgumentError, NotWritableError, TensorChangedError

MakeSaver = Callable[..., AsyncSaver]


def _save_and_finish(make_saver: MakeSaver, tmp_path: pathlib.Path, model: torch.nn.Module,
                     obj: object, after: Callable[[], object]) -> dict:
    """model= save behind a busy writer, run `after` (the training loop), then commit; return the file."""
    saver, sink, blocker = busy_writer(make_saver, tmp_path)
    handle = torchaux.save_async(obj, tmp_path / "m.pt", model=model, saver=saver)
    after()
    sink.release()
    handle.wait(timeout=WAIT_S)
    blocker.wait(timeout=WAIT_S)
    return torch.load(tmp_path / "m.pt")


def test_embedding_max_norm_forward_is_fenced(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """nn.Embedding(max_norm=) renormalises its weight in forward: the file keeps the value at the call."""
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4, max_norm=1.0))
    with torch.no_grad():
        model[0].weight.fill_(10.0)
    before = model[0].weight.detach().clone()
    got = _save_and_finish(make_saver, tmp_path, model, {"other": torch.ones(1000), "model": model.state_dict()},
                           lambda: model(torch.arange(8)))
    assert torch.equal(got["model"]["0.weight"], before)


def test_direct_submodule_call_is_fenced(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """Calling a submodule of model directly (model.backbone(x)) waits for its buffers' copies."""
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    before = model[0].running_mean.clone()
    got = _save_and_finish(make_saver, tmp_path, model, model.state_dict(), lambda: model[0](torch.randn(16, 4) + 5))
    assert torch.equal(got["0.running_mean"], before)


@pytest.mark.parametrize("variant", ["Module.compile", "model=compiled", "call=compiled"])
def test_compiled_models_are_fenced(make_saver: MakeSaver, tmp_path: pathlib.Path, variant: str) -> None:
    """m.compile() and torch.compile(m), passed as model= or only called, wait for the copies."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    x = torch.randn(16, 4) + 5
    if variant == "Module.compile":
        m.compile(backend="eager")
        model, call = m, m
    else:
        c = torch.compile(m, backend="eager")
        model, call = (c, c) if variant == "model=compiled" else (m, c)
    call(x)
    before = m[1].running_mean.clone()
    got = _save_and_finish(make_saver, tmp_path, model, m.state_dict(), lambda: call(x))
    assert torch.equal(got["1.running_mean"], before)
    assert "_compiled_call_impl" not in m.__dict__ or not isinstance(
        m.__dict__["_compiled_call_impl"], fence._FencedCompiledCall)


def test_two_savers_on_one_model_both_stay_fenced(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """A second model= save of the same model does not drop the first one's fence."""
    model = torch.nn.BatchNorm1d(4)
    before = model.running_mean.clone()
    saver_a, sink, blocker = busy_writer(make_saver, tmp_path)
    saver_b = make_saver()
    ha = torchaux.save_async(model.state_dict(), tmp_path / "a.pt", model=model, saver=saver_a)
    hb = torchaux.save_async(model.state_dict(), tmp_path / "b.pt", model=model, saver=saver_b)
    hb.staged.result(WAIT_S)
    model(torch.randn(16, 4) + 5)
    sink.release()
    ha.wait(WAIT_S), hb.wait(WAIT_S), blocker.wait(WAIT_S)
    for n in "ab":
        assert torch.equal(torch.load(tmp_path / f"{n}.pt")["running_mean"], before)


def test_save_from_an_optimizer_step_pre_hook(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """save_async(model=) called in a step pre-hook is staged before the step changes the weights."""
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, foreach=True)
    model(torch.randn(3, 4)).sum().backward()
    saver, sink, blocker = busy_writer(make_saver, tmp_path)
    seen = {}

    def save(o: object, a: object, k: object) -> None:
        seen["w"] = model.weight.detach().clone()
        seen["h"] = torchaux.save_async({"model": model.state_dict()}, tmp_path / "m.pt", model=model, saver=saver)

    opt.register_step_pre_hook(save)
    opt.step()
    sink.release()
    seen["h"].wait(WAIT_S), blocker.wait(WAIT_S)
    assert torch.equal(torch.load(tmp_path / "m.pt")["model"]["weight"], seen["w"])


@pytest.mark.parametrize("case", ["backward-after", "load_state_dict"])
def test_updates_outside_forward_are_fenced(make_saver: MakeSaver, tmp_path: pathlib.Path, case: str) -> None:
    """A backward of a loss computed before the save (then hand-written SGD) and load_state_dict are fenced."""
    model = torch.nn.Linear(4, 4)
    loss = model(torch.randn(8, 4)).sum()
    before = model.weight.detach().clone()

    def after() -> None:
        if case == "backward-after":
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        else:
            model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})

    assert torch.equal(_save_and_finish(make_saver, tmp_path, model, model.state_dict(), after)["weight"], before)


def test_unfenced_inplace_update_fails_the_save_loudly(make_saver: MakeSaver, tmp_path: pathlib.Path) -> None:
    """An in-place update no fence sees fails the save with TensorChangedError; the old file stays."""
    model = torch.nn.Linear(4, 4)
    target = tmp_path / "m.pt"
    torch.save({"old": True}, target)
    saver, sink, blocker = busy_writer(make_saver, tmp_path)
    handle = torchaux.save_async({"ema": model.state_dict()}, target, model=model, saver=saver)
    with torch.no_grad():
        model.weight.mul_(0.5)  # e.g. an EMA update outside forward/backward/step
    sink.release()
    with pytest.raises(TensorChangedError, match="'ema.weight'.*eager mode"):
        handle.wait(WAIT_S)
    blocker.wait(WAIT_S)
    assert torch.load(target) == {"old": True}


@pytest.mark.parametrize("where", ["save_async", "AsyncSaver.submit"])
def test_keyboard_interrupt_at_any_line_leaves_no_slot_or_fence(tmp_path: pathlib.Path, where: str) -> None:
    """KeyboardInterrupt at each line of save_async (or the saver's submit): no armed fence, the saver still saves."""
    from torchaux.checkpoint import api

    code = api.save_async.__code__ if where == "save_async" else AsyncSaver.submit.__code__
    for nth in range(1, 200):
        saver = AsyncSaver()
        model = torch.nn.Linear(2, 2)
        count = [0]

        def local(frame, event, arg):  # type: ignore[no-untyped-def]
            if event == "line":
                count[0] += 1
                if count[0] == nth:
                    raise KeyboardInterrupt
            return local

        sys.settrace(lambda f, e, a: local if f.f_code is code else None)
        try:
            handle = torchaux.save_async(model.state_dict(), tmp_path / "m.pt", model=model, saver=saver)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        finally:
            sys.settrace(None)
        if not interrupted:
            handle.wait(WAIT_S)
            break
        saver.wait(WAIT_S)
        assert fence.armed_count() == 0, nth
        probe = background(lambda: torchaux.save_async(torch.ones(1), tmp_path / "p.pt", saver=saver).wait(WAIT_S))
        probe.result(timeout=WAIT_S)  # a lost slot would block this save forever
        saver.close()
    assert not interrupted


def test_global_hooks_are_removed_once_nothing_is_armed(tmp_path: pathlib.Path) -> None:
    """After a model= save is staged, no process-global module hook is left (unrelated forwards stay fast)."""
    from torch.nn.modules import module as module_mod

    other = torch.nn.Linear(2, 2)
    torchaux.save_async(other.state_dict(), tmp_path / "o.pt", model=other).wait(WAIT_S)
    assert not fence.hooks_installed()
    assert fence._forward_pre not in module_mod._global_forward_pre_hooks.values()


def test_process_saver_is_refused_at_the_call(tmp_path: pathlib.Path) -> None:
    """save_async(saver=ProcessSaver()) raises TypeError before any I/O."""
    from torchaux.checkpoint.engine.process_saver import ProcessSaver

    saver = ProcessSaver()
    try:
        with pytest.raises(TypeError, match="ProcessSaver"):
            torchaux.save_async({"w": torch.ones(3)}, tmp_path / "p.pt", saver=saver)
    finally:
        saver.close()
    assert not (tmp_path / "p.pt").exists()


def test_argument_errors_have_torch_save_types(tmp_path: pathlib.Path) -> None:
    """No write() -> AttributeError; read-only file -> io.UnsupportedOperation; bad path -> RuntimeError too."""
    for target in (torch.rand(3), 3):
        with pytest.raises(AttributeError) as info:
            torchaux.save_async("foo", target)  # type: ignore[arg-type]
        assert isinstance(info.value, (TypeError, InvalidArgumentError))
    p = tmp_path / "f.bin"
    p.write_bytes(b"x")
    with open(p, "rb") as f, pytest.raises(io.UnsupportedOperation) as ro:
        torchaux.save_async({"w": torch.ones(1)}, f)
    assert isinstance(ro.value, NotWritableError)
    for bad in (tmp_path, tmp_path / "missing" / "x.pt"):
        with pytest.raises(RuntimeError):
            torchaux.save_async({"w": torch.ones(1)}, bad)


def _crcs(b: bytes) -> dict[str, int]:
    return {i.filename.split("/", 1)[1]: i.CRC for i in zipfile.ZipFile(io.BytesIO(b)).infolist()}


def test_caller_thread_serialization_settings_apply() -> None:
    """set_crc32_options(False) and config.save.storage_alignment on the caller reach the writer thread."""
    from torch.utils.serialization import config

    sd = {"w": torch.ones(4)}
    torch.serialization.set_crc32_options(False)
    config.save.storage_alignment = 4096
    try:
        ref, ours = io.BytesIO(), io.BytesIO()
        torch.save(sd, ref)
        torchaux.save_async(sd, ours).wait(WAIT_S)
    finally:
        torch.serialization.set_crc32_options(True)
        config.save.storage_alignment = 64
    assert _crcs(ours.getvalue())["data/0"] == 0
    assert ours.getvalue()[:-200] != b"" and len(ours.getvalue()) == len(ref.getvalue())
    assert _crcs(ours.getvalue()) == _crcs(ref.getvalue()) | {".data/serialization_id": _crcs(ours.getvalue())[".data/serialization_id"]}


def test_skip_data_is_honoured_also_for_fake_tensors() -> None:
    """Under skip_data() storages are written as zeros with CRC 0 (as torch.save); fake tensors save too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sd = {"w": torch.ones(4)}
    ref, ours = io.BytesIO(), io.BytesIO()
    with torch.serialization.skip_data():
        torch.save(sd, ref)
        torchaux.save_async(sd, ours).wait(WAIT_S)
    assert _crcs(ours.getvalue())["data/0"] == 0 and len(ours.getvalue()) == len(ref.getvalue())
    assert torch.equal(torch.load(io.BytesIO(ours.getvalue()))["w"], torch.zeros(4))
    with FakeTensorMode():
        fake = {"t": torch.randn(2, 3)}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        ref, ours = io.BytesIO(), io.BytesIO()
        torch.save(fake, ref)
        torchaux.save_async(fake, ours).wait(WAIT_S)
    assert len(ours.getvalue()) == len(ref.getvalue())


@pytest.mark.parametrize("obj", [{"e": torch.empty(0)}, {"w": torch.ones(4), "e": torch.empty(0)}])
def test_serialization_id_crc_half_matches_torch_with_empty_storages(obj: dict) -> None:
    """Digits 21-40 of the id equal torch's also when a storage is empty."""
    def sid(save: Callable[[object, io.BytesIO], object]) -> str:
        b = io.BytesIO()
        save(obj, b)
        b.seek(0)
        with torch.serialization._open_zipfile_reader(b) as z:
            return z.get_record(".data/serialization_id").decode()

    assert sid(lambda o, f: torchaux.save_async(o, f).wait(WAIT_S))[20:] == sid(torch.save)[20:]
