"""Tests for save_graph_tensor: naming, snapshots, torch.compile and CUDA graphs."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import torchaux
from torchaux.checkpoint.storage.commit import atomic_write
from torchaux.training.graph_dump import cuda as graph_dump_cuda
from torchaux.training.graph_dump import dump as graph_dump
from torchaux.training.graph_dump.dump import save_graph_tensor, save_npugraph_tensor

CPU_INDEX = graph_dump._device_index(torch.device("cpu"))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def load(path: Path) -> torch.Tensor:
    """torch.load a dump onto the CPU."""
    tensor = torch.load(path, weights_only=True, map_location="cpu")
    assert isinstance(tensor, torch.Tensor)
    return tensor


def files(directory: Path) -> list[str]:
    """Sorted file names in ``directory``."""
    return sorted(os.listdir(directory))


def dump_names(stem: str, count: int, index: int = CPU_INDEX, suffix: str = ".pt") -> list[str]:
    """Names of ``count`` dumps to ``stem + suffix``, in dump order (also sorted order)."""
    base = f"{stem}_device_{index}"
    return [base + suffix] + [f"{base}_{n}{suffix}" for n in range(1, count)]


@pytest.fixture(autouse=True)
def _settle_writes() -> Iterator[None]:
    yield
    torchaux.wait_saves()


@pytest.fixture
def compiler() -> Iterator[None]:
    """Fresh Dynamo state, no compile caches, one compile thread."""
    # The FX/AOT caches do not key on side-effect registration (research B.2),
    # so a cached graph from another run could hide a regression.
    torch._dynamo.reset()
    with (
        torch._inductor.config.patch(force_disable_caches=True, compile_threads=1),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", "dynamo_pgo force disabled", UserWarning)
        yield
    torch._dynamo.reset()


# -- eager: values and names ---------------------------------------------------


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(2, 3),
        torch.randn(4).to(torch.bfloat16),
        torch.tensor(7, dtype=torch.int64),
        torch.tensor([[True, False], [False, True]]),
        torch.randn(3, dtype=torch.complex64),
        torch.empty(0, 3, dtype=torch.float16),
    ],
    ids=["f32", "bf16", "int64-0d", "bool", "complex64", "f16-empty"],
)
def test_file_round_trips_value_dtype_and_shape(tmp_path: Path, tensor: torch.Tensor) -> None:
    """torch.load of the dump equals the tensor, with its dtype and shape."""
    save_graph_tensor(tensor, str(tmp_path / "t.pt"))
    torchaux.wait_saves()
    loaded = load(tmp_path / f"t_device_{CPU_INDEX}.pt")
    assert loaded.dtype == tensor.dtype
    assert loaded.shape == tensor.shape
    assert torch.equal(loaded, tensor)


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_device_index_then_sequence_number_is_appended(tmp_path: Path, suffix: str) -> None:
    """Dumps to x<suffix> write x_device_<i><suffix>, then x_device_<i>_1<suffix>, _2, ..."""
    for value in range(3):
        save_graph_tensor(torch.full((2,), float(value)), tmp_path / f"x{suffix}")
    torchaux.wait_saves()
    names = dump_names("x", 3, suffix=suffix)
    assert files(tmp_path) == names
    assert [load(tmp_path / n)[0].item() for n in names] == [0.0, 1.0, 2.0]


def test_relative_and_absolute_spellings_share_one_sequence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'x.pt' and the same file spelled absolutely count as one name, never overwriting."""
    monkeypatch.chdir(tmp_path)
    save_graph_tensor(torch.zeros(1), "x.pt")
    save_graph_tensor(torch.ones(1), str(tmp_path / "x.pt"))
    torchaux.wait_saves()
    assert files(tmp_path) == dump_names("x", 2)


def test_default_name_is_timestamped_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without save_path the file is tensor_<timestamp>_device_<i>.pt in the CWD."""
    monkeypatch.chdir(tmp_path)
    save_graph_tensor(torch.arange(3))
    torchaux.wait_saves()
    (name,) = files(tmp_path)
    assert re.fullmatch(rf"tensor_\d{{20}}_device_{CPU_INDEX}\.pt", name)
    assert torch.equal(load(tmp_path / name), torch.arange(3))


def test_missing_directories_are_created(tmp_path: Path) -> None:
    """Parent directories of save_path are created."""
    save_graph_tensor(torch.ones(2), tmp_path / "a" / "b" / "x.pt")
    torchaux.wait_saves()
    assert files(tmp_path / "a" / "b") == [f"x_device_{CPU_INDEX}.pt"]


def test_in_place_update_after_the_dump_does_not_reach_the_file(tmp_path: Path) -> None:
    """The file holds the value at the call even if the tensor is mutated right after."""
    x = torch.arange(1000.0)
    save_graph_tensor(x, tmp_path / "x.pt")
    x.mul_(-1)
    torchaux.wait_saves()
    assert torch.equal(load(tmp_path / f"x_device_{CPU_INDEX}.pt"), torch.arange(1000.0))


def test_a_view_is_saved_without_the_rest_of_its_storage(tmp_path: Path) -> None:
    """Dumping a strided slice saves only the slice's values, compactly."""
    base = torch.arange(10_000.0).reshape(100, 100)
    save_graph_tensor(base[3:5, ::10], tmp_path / "v.pt")
    torchaux.wait_saves()
    loaded = load(tmp_path / f"v_device_{CPU_INDEX}.pt")
    assert torch.equal(loaded, base[3:5, ::10])
    assert loaded.untyped_storage().nbytes() == loaded.numel() * loaded.element_size()


@pytest.mark.parametrize("mode", ["requires_grad", "no_grad", "inference_mode"])
def test_autograd_modes_dump_without_warnings(tmp_path: Path, mode: str) -> None:
    """Grad-requiring tensors, no_grad and inference_mode all dump, warning-free."""
    contexts: dict[str, contextlib.AbstractContextManager[object]] = {
        "requires_grad": contextlib.nullcontext(),
        "no_grad": torch.no_grad(),
        "inference_mode": torch.inference_mode(),
    }
    w = torch.ones(3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with contexts[mode]:
            save_graph_tensor(w * 2, tmp_path / "w.pt")
        torchaux.wait_saves()
    loaded = load(tmp_path / f"w_device_{CPU_INDEX}.pt")
    assert torch.equal(loaded, torch.full((3,), 2.0))
    assert not loaded.requires_grad


def test_npu_name_is_an_alias() -> None:
    """save_npugraph_tensor is the same function as save_graph_tensor."""
    assert save_npugraph_tensor is save_graph_tensor


# -- bad input: errors before any I/O ----------------------------------------------


@pytest.mark.parametrize("name", ["x.txt", "x", "x.pth", "x.PT", ".pt", "sub/"])
def test_bad_path_raises_value_error_before_any_io(tmp_path: Path, name: str) -> None:
    """A path not ending in .pt/.bin (or naming no file) raises ValueError, creating nothing."""
    with pytest.raises(ValueError, match=r"save_path must"):
        save_graph_tensor(torch.ones(1), os.path.join(str(tmp_path), "new", name))
    torchaux.wait_saves()
    assert files(tmp_path) == []


@pytest.mark.parametrize(
    ("tensor", "path", "error"),
    [
        ([1.0, 2.0], None, TypeError),
        (torch.ones(1), 3, TypeError),
        (torch.ones(1), b"x.pt", TypeError),
        (torch.eye(2).to_sparse(), None, ValueError),
        (torch.ones(2, device="meta"), None, ValueError),
    ],
    ids=["list", "int-path", "bytes-path", "sparse", "meta"],
)
def test_bad_arguments_raise_before_any_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tensor: object, path: object, error: type
) -> None:
    """Wrong types raise TypeError, sparse/meta tensors ValueError; nothing is written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match="save_graph_tensor|save_path"):
        save_graph_tensor(tensor, path)  # type: ignore[arg-type]
    torchaux.wait_saves()
    assert files(tmp_path) == []


def test_file_in_place_of_a_directory_raises_value_error(tmp_path: Path) -> None:
    """A file where a parent directory must go raises ValueError naming it."""
    (tmp_path / "blocker").write_bytes(b"")
    with pytest.raises(ValueError, match="blocker"):
        save_graph_tensor(torch.ones(1), tmp_path / "blocker" / "x.pt")


# -- background writing ----------------------------------------------------------------


Sink = Callable[[str], contextlib.AbstractContextManager[BinaryIO]]


def _sink_with(before_open: Callable[[], object]) -> Sink:
    @contextlib.contextmanager
    def sink(path: str) -> Iterator[BinaryIO]:
        before_open()
        with atomic_write(path) as out:
            yield out

    return sink


def test_dump_returns_before_its_write_and_wait_saves_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write happens off the calling thread; torchaux.wait_saves() waits for it."""
    gate = threading.Event()
    saver = graph_dump._DumpSaver(max_pending=4, sink=_sink_with(lambda: gate.wait(30)))
    monkeypatch.setattr(graph_dump, "_saver", saver)
    save_graph_tensor(torch.ones(2), tmp_path / "x.pt")
    assert files(tmp_path) == []
    gate.set()
    torchaux.wait_saves()
    assert files(tmp_path) == [f"x_device_{CPU_INDEX}.pt"]
    saver.close()


def test_failed_write_is_raised_by_wait_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dump whose write fails re-raises that error from torchaux.wait_saves()."""
    error = OSError("disk full")

    def fail() -> None:
        raise error

    saver = graph_dump._DumpSaver(max_pending=4, sink=_sink_with(fail))
    monkeypatch.setattr(graph_dump, "_saver", saver)
    save_graph_tensor(torch.ones(2), tmp_path / "x.pt")
    with pytest.raises(OSError, match="disk full") as info:
        torchaux.wait_saves()
    assert info.value is error
    saver.close()


def test_second_import_reuses_the_registered_operator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Executing the module again (a second import) neither fails nor loses dumps."""
    spec = importlib.util.spec_from_file_location("_graph_dump_copy", graph_dump.__file__)
    assert spec is not None
    assert spec.loader is not None
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, copy)
    spec.loader.exec_module(copy)
    assert copy._OP is graph_dump._OP
    copy.save_graph_tensor(torch.ones(2), tmp_path / "x.pt")
    torchaux.wait_saves()
    assert files(tmp_path) == [f"x_device_{CPU_INDEX}.pt"]


# -- torch.compile ----------------------------------------------------------------------


def _model(tmp_path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    def step(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        save_graph_tensor(y, str(tmp_path / "y.pt"))
        y.add_(100)
        save_graph_tensor(y, str(tmp_path / "y_after.pt"))
        save_graph_tensor(x, str(tmp_path / "x.pt"))
        x.mul_(0)
        return y

    return step


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_fullgraph_keeps_dumps_with_pre_mutation_values(
    tmp_path: Path, compiler: None, backend: str
) -> None:
    """A fullgraph compile is one frame; each call writes every dump with its value then."""
    counter = CompileCounterWithBackend(backend)
    step = torch.compile(_model(tmp_path), backend=counter, fullgraph=True)
    inputs = [torch.arange(4.0), torch.arange(4.0) + 10]
    expected = [x.clone() for x in inputs]
    outputs = [step(x) for x in inputs]
    torchaux.wait_saves()
    assert counter.frame_count == 1
    names = zip(dump_names("y", 2), dump_names("y_after", 2), dump_names("x", 2), strict=True)
    for (y_name, after_name, x_name), x, out in zip(names, expected, outputs, strict=True):
        assert torch.equal(load(tmp_path / y_name), x * 2)
        assert torch.equal(load(tmp_path / after_name), x * 2 + 100)
        assert torch.equal(load(tmp_path / x_name), x)
        assert torch.equal(out, x * 2 + 100)
    assert all(torch.equal(x, torch.zeros(4)) for x in inputs)
    assert len(files(tmp_path)) == 6


def test_dump_without_side_effect_marking_is_dead_code(tmp_path: Path, compiler: None) -> None:
    """Negative control: the same operator without has_side_effect is dropped by aot_eager."""
    unmarked = graph_dump._define_op("torchaux_test_v1::save_graph_tensor", side_effect=False)

    def step(x: torch.Tensor) -> torch.Tensor:
        y = x + 1
        unmarked(y, save_path=str(tmp_path / "compiled.pt"))
        return y * 2

    counter = CompileCounterWithBackend("aot_eager")
    torch.compile(step, backend=counter, fullgraph=True)(torch.ones(2))
    unmarked(torch.ones(2), save_path=str(tmp_path / "eager.pt"))
    torchaux.wait_saves()
    assert counter.frame_count == 1
    assert files(tmp_path) == [f"eager_device_{CPU_INDEX}.pt"]


def test_compiled_training_step_dumps_and_keeps_gradients(tmp_path: Path, compiler: None) -> None:
    """In a compiled forward of a training step the dump is written and gradients are unchanged."""

    def loss_fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ w)
        save_graph_tensor(h, str(tmp_path / "h.pt"))
        return h.sum()

    x, w = torch.randn(4, 3), torch.randn(3, 2, requires_grad=True)
    reference = w.detach().clone().requires_grad_()
    torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(x, w).backward()  # type: ignore[no-untyped-call]
    torch.relu(x @ reference).sum().backward()  # type: ignore[no-untyped-call]
    torchaux.wait_saves()
    assert w.grad is not None
    assert reference.grad is not None
    assert torch.allclose(w.grad, reference.grad)
    assert files(tmp_path) == [f"h_device_{CPU_INDEX}.pt"]
    assert torch.equal(load(tmp_path / f"h_device_{CPU_INDEX}.pt"), torch.relu(x @ w).detach())


def test_bad_path_fails_compilation_with_the_message(tmp_path: Path, compiler: None) -> None:
    """Under fullgraph compile a bad suffix fails tracing with our message, writing nothing."""

    def step(x: torch.Tensor) -> torch.Tensor:
        save_graph_tensor(x, str(tmp_path / "x.txt"))
        return x + 1

    with pytest.raises(Exception, match=r"must end in '\.pt' or '\.bin'"):
        torch.compile(step, backend="aot_eager", fullgraph=True)(torch.ones(2))
    assert files(tmp_path) == []


# -- CUDA graph plumbing, exercised without a GPU ------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build")
def test_capture_check_does_not_raise_on_cpu_builds() -> None:
    """is_capturing is False for a 'cuda' device on a CPU-only build instead of raising."""
    assert graph_dump_cuda.is_capturing(torch.device("cuda")) is False


@pytest.mark.parametrize(
    "like",
    [torch.zeros(2, 3), torch.zeros(4, dtype=torch.bfloat16), torch.zeros(()), torch.zeros(0, 2)],
    ids=["f32", "bf16", "0d", "empty"],
)
def test_each_host_callback_writes_a_new_file_with_that_replays_bytes(
    tmp_path: Path, like: torch.Tensor
) -> None:
    """Calling the ctypes trampoline like three replays writes three files, each its own values."""
    graph_dump._dump_saver()  # as graph_dump._kernel does before record_dump
    target = graph_dump._resolve(str(tmp_path / "r.pt"), torch.device("cuda", 0))
    staging = torch.zeros(like.numel() * like.element_size(), dtype=torch.uint8)
    on_replay = functools.partial(graph_dump._write, target)
    record = graph_dump_cuda._Recorded(staging, like.dtype, like.shape, on_replay)
    key, host = graph_dump_cuda._register(record), record.host_view()
    for value in range(3):
        host.fill_(value)
        graph_dump_cuda._TRAMPOLINE(key)
    host.fill_(-1)
    torchaux.wait_saves()
    names = dump_names("r", 3, index=0)
    assert files(tmp_path) == names
    for value, name in enumerate(names):
        loaded = load(tmp_path / name)
        assert loaded.dtype == like.dtype
        assert loaded.shape == like.shape
        assert torch.equal(loaded, torch.full_like(like, value))


def test_wait_saves_waits_for_replays_the_device_has_not_reached_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replays still queued on the GPU call back during wait_saves' device sync: their files count.

    The device is simulated: its synchronization fires the host callbacks of
    three queued replays, as a GPU does when it reaches them.  (wait_saves
    once drained the dump queue before synchronizing, and returned with no
    replay's file written: seen on an H200.)
    """
    graph_dump._dump_saver()
    target = graph_dump._resolve(str(tmp_path / "q.pt"), torch.device("cuda", 0))
    staging = torch.zeros(8, dtype=torch.uint8)
    record = graph_dump_cuda._Recorded(staging, torch.uint8, staging.shape,
                                       functools.partial(graph_dump._write, target))
    key = graph_dump_cuda._register(record)
    queued = [1, 2, 3]

    def device_reaches_queued_replays() -> None:
        while queued:
            staging.fill_(queued.pop(0))
            graph_dump_cuda._TRAMPOLINE(key)

    monkeypatch.setattr(graph_dump_cuda, "synchronize_recorded_devices", device_reaches_queued_replays)
    torchaux.wait_saves()
    names = dump_names("q", 3, index=0)
    assert files(tmp_path) == names
    for value, name in enumerate(names, start=1):
        assert torch.equal(load(tmp_path / name), torch.full((8,), value, dtype=torch.uint8))


def test_host_callback_failure_is_raised_by_wait_saves(tmp_path: Path) -> None:
    """An exception inside a host callback is re-raised by wait_saves, not printed and lost."""
    error = RuntimeError("callback broke")

    def fail(_: torch.Tensor) -> None:
        raise error

    graph_dump._dump_saver()
    staging = torch.zeros(4, dtype=torch.uint8)
    record = graph_dump_cuda._Recorded(staging, torch.uint8, staging.shape, fail)
    graph_dump_cuda._TRAMPOLINE(graph_dump_cuda._register(record))
    with pytest.raises(RuntimeError) as info:
        torchaux.wait_saves()
    assert info.value is error


# -- CUDA (GPU only) ---------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_eager_cuda_dump_holds_the_value_at_the_call(tmp_path: Path) -> None:
    """An eager CUDA dump survives a later in-place kernel and loads with map_location."""
    x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    save_graph_tensor(x, tmp_path / "x.pt")
    x.mul_(-1)
    torchaux.wait_saves()
    loaded = load(tmp_path / f"x_device_{x.device.index}.pt")
    assert torch.equal(loaded, torch.arange(1 << 20, dtype=torch.float32))


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replays_each_write_a_new_file(tmp_path: Path) -> None:
    """Every replay of a captured graph writes its own file with that replay's values."""
    x = torch.zeros(4, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x * 2
        save_graph_tensor(y, str(tmp_path / "y.pt"))
        y.add_(1)
    torchaux.wait_saves()
    assert files(tmp_path) == []
    for value in range(3):
        x.fill_(value)
        graph.replay()
    torchaux.wait_saves()
    names = dump_names("y", 3, index=x.device.index)
    assert files(tmp_path) == names
    for value, name in enumerate(names):
        assert torch.equal(load(tmp_path / name), torch.full((4,), 2.0 * value))


@pytest.mark.gpu
@needs_cuda
def test_reduce_overhead_writes_one_file_per_call(tmp_path: Path, compiler: None) -> None:
    """With CUDA-graph trees (warm-up, record, replays) each call writes exactly one file."""

    def step(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        save_graph_tensor(y, str(tmp_path / "y.pt"))
        return y + 1

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    x = torch.zeros(4, device="cuda")
    for value in range(4):
        x.fill_(value)
        compiled(x)
    torchaux.wait_saves()
    names = dump_names("y", 4, index=x.device.index)
    assert files(tmp_path) == names
    for value, name in enumerate(names):
        assert torch.equal(load(tmp_path / name), torch.full((4,), 2.0 * value))
