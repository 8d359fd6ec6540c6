"""Tests for torchaux.training.flops: the counter, its breakdown and the overhead benchmark.

The first group mirrors torch_npu's documented example (``[recorded, traversed]``
after start/pause/resume); then parity with ``torch.utils.flop_counter.FlopCounterMode``
on every op both count, the CPU attention kernels it misses, recomputation,
torch.compile, threads, and errors.  Closed-form formulas are in
``test_flops_formulas.py``.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from torchaux.training.flops import FlopsCounter, measure_overhead, register_formula
from torchaux.training.flops.formulas import sdpa_backward_flops, sdpa_flops

Step = Callable[[], None]


@pytest.fixture
def counter() -> Iterator[FlopsCounter]:
    """The singleton, zeroed and stopped before and after the test."""
    c = FlopsCounter()
    assert not c.is_running, "a previous test left the counter running"
    c.reset()
    c.resume()
    yield c
    if c.is_running:
        c.stop()
    c.reset()


def _count(counter: FlopsCounter, step: Step, **start_options: object) -> list[int]:
    counter.start(**start_options)  # type: ignore[arg-type]
    try:
        step()
    finally:
        counter.stop()
    return counter.get_flops()


def _upstream(step: Step) -> FlopCounterMode:
    with FlopCounterMode(display=False) as mode:
        step()
    return mode


def _train(model: nn.Module, *inputs: torch.Tensor) -> Step:
    return lambda: model(*inputs).sum().backward()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))


class _Matmuls(nn.Module):
    """bmm, baddbmm, einsum and a broadcast 4-D matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5, 6))
        self.b = nn.Parameter(torch.randn(3, 4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.baddbmm(self.b, x, self.w) + torch.bmm(x, self.w)
        z = torch.einsum("bij,bjk->bik", y, self.w.transpose(1, 2))
        return torch.matmul(z.unsqueeze(0).expand(2, 3, 4, 5), self.w)


PARITY_MODELS = {
    "mlp-3d-input": lambda: _train(_mlp(), torch.randn(2, 3, 8, requires_grad=True)),
    "mlp-frozen-input": lambda: _train(_mlp(), torch.randn(4, 8)),
    "conv1d-stride-dilation": lambda: _train(
        nn.Conv1d(3, 6, 3, stride=2, dilation=2), torch.randn(2, 3, 20, requires_grad=True)
    ),
    "conv2d-pad": lambda: _train(nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 10, 10)),
    "conv2d-groups": lambda: _train(
        nn.Conv2d(4, 6, 3, groups=2, bias=False), torch.randn(1, 4, 5, 5, requires_grad=True)
    ),
    "conv3d": lambda: _train(nn.Conv3d(2, 4, 2, stride=2), torch.randn(1, 2, 6, 6, 6)),
    "conv-transpose2d": lambda: _train(
        nn.ConvTranspose2d(4, 2, 3, stride=2), torch.randn(1, 4, 5, 5, requires_grad=True)
    ),
    "bmm-baddbmm-einsum-matmul": lambda: _train(
        _Matmuls(), torch.randn(3, 4, 5, requires_grad=True)
    ),
}


# -- torch_npu semantics ----------------------------------------------------------------


def test_singleton() -> None:
    """FlopsCounter() returns one object per process, and constructing it resets nothing."""
    first = FlopsCounter()
    first.reset()
    first.start(by_module=False)
    _ = torch.ones(3, 4) @ torch.ones(4, 3)
    first.stop()
    assert FlopsCounter() is first
    assert FlopsCounter().get_flops() == [72, 72]
    first.reset()


def test_torch_npu_doc_example(counter: FlopsCounter) -> None:
    """start/pause/resume give torch_npu's documented [recorded, traversed] sequence."""
    a, b = torch.ones(3, 4), torch.ones(4, 3)
    seen = []
    counter.start()
    _ = a @ b
    seen.append(counter.get_flops())
    counter.pause()
    _ = a @ b
    seen.append(counter.get_flops())
    counter.resume()
    _ = a @ b
    seen.append(counter.get_flops())
    counter.stop()
    assert seen == [[72, 72], [72, 144], [144, 216]]


def test_stop_keeps_values_and_start_zeroes(counter: FlopsCounter) -> None:
    """After stop() values stay readable and ops are not counted; start() begins from zero."""
    a, b = torch.ones(3, 4), torch.ones(4, 3)
    assert _count(counter, lambda: a @ b) == [72, 72]
    _ = a @ b
    assert counter.get_flops() == [72, 72]
    counter.start()
    assert counter.get_flops() == [0, 0]
    counter.stop()


def test_reset_while_running(counter: FlopsCounter) -> None:
    """reset() zeroes a running counter, which keeps counting."""
    a, b = torch.ones(3, 4), torch.ones(4, 3)
    counter.start()
    _ = a @ b
    counter.reset()
    _ = a @ b
    counter.stop()
    assert counter.get_flops() == [72, 72]
    assert counter.breakdown().by_op["aten.mm"].total == 72


def test_context_managers(counter: FlopsCounter) -> None:
    """`with FlopsCounter()` starts and stops; `paused()` restores the previous pause state."""
    a, b = torch.ones(3, 4), torch.ones(4, 3)
    with FlopsCounter() as c:
        with c.paused():
            _ = a @ b
        assert not c.is_paused
        _ = a @ b
    assert not counter.is_running
    assert counter.get_flops() == [72, 144]


# -- parity with FlopCounterMode ------------------------------------------------------


@pytest.mark.parametrize("make_step", PARITY_MODELS.values(), ids=PARITY_MODELS.keys())
def test_parity_with_flop_counter_mode(counter: FlopsCounter, make_step: Callable[[], Step]
                                       ) -> None:
    """Totals and per-op counts equal FlopCounterMode's, forward plus backward."""
    upstream = _upstream(make_step())
    model, total = _count(counter, make_step())
    expected_ops = {str(op): n for op, n in upstream.get_flop_counts()["Global"].items()}
    assert total == model == upstream.get_total_flops() > 0
    assert {op: f.total for op, f in counter.breakdown().by_op.items()} == expected_ops


def test_module_breakdown_matches_flop_counter_mode(counter: FlopsCounter) -> None:
    """Per-module FLOPs (forward and backward attribution) equal FlopCounterMode's."""
    make = PARITY_MODELS["mlp-3d-input"]
    upstream = _upstream(make()).get_flop_counts()
    _count(counter, make(), by_module=True)
    ours = counter.breakdown().by_module
    assert {name: {op: f.total for op, f in ops.items()} for name, ops in ours.items()} == {
        name: {str(op): n for op, n in ops.items()} for name, ops in upstream.items()
    }
    assert set(ours) == {"Global", "Sequential", "Sequential.0", "Sequential.2"}


def test_linear_and_conv_backward_multipliers(counter: FlopsCounter) -> None:
    """Backward costs 2x forward when the input needs grad and 1x when it does not."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 16)
    assert _count(counter, lambda: lin(torch.randn(4, 8)))[1] == 1024
    assert _count(counter, _train(lin, torch.randn(4, 8)))[1] == 2048
    assert _count(counter, _train(lin, torch.randn(4, 8, requires_grad=True)))[1] == 3072
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert _count(counter, _train(conv, torch.randn(2, 3, 10, 10, requires_grad=True)))[1] == (
        3 * 86400
    )


def test_inference_mode_and_no_grad_are_counted(counter: FlopsCounter) -> None:
    """Under inference_mode (aten.linear arrives undecomposed) and no_grad the addmm counts."""
    lin, x = nn.Linear(8, 16), torch.randn(4, 8)

    def both() -> None:
        with torch.inference_mode():
            lin(x)
        with torch.no_grad():
            lin(x)

    assert _count(counter, both) == [2048, 2048]


def test_vector_products_are_counted(counter: FlopsCounter) -> None:
    """mv and dot (uncounted by FlopCounterMode) count 2 FLOPs per multiply-add."""
    m, v = torch.ones(5, 4), torch.ones(4)
    assert _count(counter, lambda: (m @ v, v @ v)) == [2 * 20 + 2 * 4] * 2


def test_fake_tensor_counting_equals_real(counter: FlopsCounter) -> None:
    """Counting on FakeTensors (no compute) gives the real counts."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _count(counter, PARITY_MODELS["mlp-3d-input"]())
    with FakeTensorMode():
        step = PARITY_MODELS["mlp-3d-input"]()
        fake = _count(counter, step)
    assert fake == real


# -- attention -------------------------------------------------------------------------


def _qkv(b: int, hq: int, hkv: int, s: int, d: int) -> list[torch.Tensor]:
    return [torch.randn(b, h, s, d, requires_grad=True) for h in (hq, hkv, hkv)]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: bool) -> Step:
    return lambda: F.scaled_dot_product_attention(q, k, v, **options).sum().backward()


@pytest.mark.parametrize("is_causal", [False, True])
def test_cpu_fused_attention_counted(counter: FlopsCounter, is_causal: bool) -> None:
    """CPU SDPA (flash-for-cpu kernel, 0 FLOPs in FlopCounterMode) counts fwd + 2.5x bwd."""
    q, k, v = _qkv(2, 4, 4, 16, 8)
    assert _count(counter, _attention(q, k, v, is_causal=is_causal)) == [65536 + 163840] * 2
    assert set(counter.breakdown().by_op) == {
        "aten._scaled_dot_product_flash_attention_for_cpu",
        "aten._scaled_dot_product_flash_attention_for_cpu_backward",
    }


def test_grouped_query_attention_counted_with_query_heads(counter: FlopsCounter) -> None:
    """GQA (8 query heads, 2 KV heads) is counted with the query heads."""
    q, k, v = _qkv(2, 8, 2, 16, 8)
    shapes = (q.shape, k.shape, v.shape)
    expected = sdpa_flops(*shapes) + sdpa_backward_flops(*shapes)
    assert expected == 131072 + 327680
    assert _count(counter, _attention(q, k, v, enable_gqa=True)) == [expected, expected]


def test_math_backend_forward_equals_fused(counter: FlopsCounter) -> None:
    """The MATH backend's bmms count the same forward FLOPs as the fused kernel."""
    q, k, v = (t.detach() for t in _qkv(2, 4, 4, 16, 8))
    fused = _count(counter, lambda: F.scaled_dot_product_attention(q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        math = _count(counter, lambda: F.scaled_dot_product_attention(q, k, v))
    assert fused == math == [65536, 65536]
    assert "aten.bmm" in counter.breakdown().by_op


def test_flex_attention_eager_counted(counter: FlopsCounter) -> None:
    """Eager flex_attention (a higher-order op) counts like SDPA, block mask not discounted."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (t.detach() for t in _qkv(1, 2, 2, 16, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile"
        flops = _count(counter, lambda: flex_attention(q, k, v))
    assert flops == [sdpa_flops(q.shape, k.shape, v.shape)] * 2
    assert counter.breakdown().uncounted == ()


# -- recomputation ---------------------------------------------------------------------


def _checkpointed(*, reentrant: bool, context_fn: object = None) -> tuple[Step, Step, Step]:
    """(plain training step, checkpointed step, forward only) on one 2-layer MLP."""
    net, x = _mlp(), torch.randn(4, 8, requires_grad=True)
    extra = {} if context_fn is None else {"context_fn": context_fn}

    def checkpointed() -> None:
        with set_checkpoint_early_stop(False):  # recompute both layers, not only what is needed
            out = checkpoint(net, x, use_reentrant=reentrant, **extra)  # type: ignore[arg-type]
            out.sum().backward()

    return _train(net, x), checkpointed, lambda: net(x)


def test_checkpoint_contexts_split_recompute(counter: FlopsCounter) -> None:
    """With checkpoint_contexts, recomputation adds to total FLOPs only."""
    plain, checkpointed, forward = _checkpointed(
        reentrant=False, context_fn=counter.checkpoint_contexts
    )
    model_plain = _count(counter, plain)[0]
    forward_flops = _count(counter, forward)[0]
    assert _count(counter, checkpointed) == [model_plain, model_plain + forward_flops]


@pytest.mark.parametrize("reentrant", [False, True])
def test_detect_recompute(counter: FlopsCounter, reentrant: bool) -> None:
    """detect_recompute=True separates checkpoint recomputation, reentrant or not."""
    plain, checkpointed, forward = _checkpointed(reentrant=reentrant)
    model_plain = _count(counter, plain)[0]
    forward_flops = _count(counter, forward)[0]
    counted = _count(counter, checkpointed, detect_recompute=True)
    assert counted == [model_plain, model_plain + forward_flops]


def test_recompute_counted_as_model_by_default(counter: FlopsCounter) -> None:
    """Without pause or detection, recomputed forward FLOPs count as model FLOPs too."""
    plain, checkpointed, forward = _checkpointed(reentrant=False)
    expected = _count(counter, plain)[0] + _count(counter, forward)[0]
    assert _count(counter, checkpointed) == [expected, expected]


# -- torch.compile ---------------------------------------------------------------------


def test_compiled_module_counted_and_not_recompiled_after_stop(counter: FlopsCounter) -> None:
    """A module first compiled while counting (module hooks on) counts like eager, compiles once.

    Regression for pytorch #190286: FlopCounterMode makes Dynamo skip a frame
    first run under it and cache the skip, so it never compiles afterwards;
    and global module hooks are guarded by Dynamo, so removing them at stop()
    would recompile.
    """
    torch._dynamo.reset()
    net, x = _mlp(), torch.randn(2, 3, 8, requires_grad=True)
    eager = _count(counter, _train(net, x))
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(net, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # OptimizedModule + global hooks notice
        assert _count(counter, _train(compiled, x), by_module=True) == eager
        assert set(counter.breakdown().by_module) == {"Global", "Sequential"}
        for _ in range(2):
            compiled(x).sum().backward()
        _count(counter, _train(compiled, x), by_module=True)
    assert backend.frame_count == 1


def test_compile_mode_eager_runs_compiled_code_eagerly(counter: FlopsCounter) -> None:
    """compile_mode="eager" counts without compiling, and compiling works again after stop()."""
    torch._dynamo.reset()
    w = torch.randn(8, 16, requires_grad=True)

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x @ w).relu().sum()

    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=backend)
    x = torch.randn(4, 8)
    flops = _count(counter, lambda: compiled(x).backward(), compile_mode="eager")
    assert flops == [2 * 1024, 2 * 1024] and backend.frame_count == 0  # x @ w and grad of w
    compiled(x).backward()
    assert backend.frame_count == 1


@pytest.mark.slow
def test_inductor_counts_like_eager(counter: FlopsCounter) -> None:
    """Inductor-compiled CPU code (extern mm/conv/attention kernels) counts like eager (10-25 s)."""
    torch._dynamo.reset()
    q, k, v = _qkv(2, 4, 4, 16, 8)
    conv, lin = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 16)
    img, x = torch.randn(2, 3, 10, 10, requires_grad=True), torch.randn(4, 8)

    def f() -> torch.Tensor:
        out = lin(x).sum() + conv(img).sum()
        return out + F.scaled_dot_product_attention(q, k, v).sum()

    eager = _count(counter, lambda: f().backward())
    compiled = torch.compile(f)
    compiled().backward()
    assert _count(counter, lambda: compiled().backward()) == eager


# -- threads and errors ----------------------------------------------------------------


def test_snapshots_are_consistent_while_other_threads_count(counter: FlopsCounter) -> None:
    """breakdown() and get_flops() taken while other threads report counts are consistent.

    Autograd threads report into the same totals; without the lock a snapshot
    iterates dicts that another thread is growing (RuntimeError) or sees
    totals that disagree with the per-op entries.
    """
    threads, per_thread = 4, 3000
    barrier = threading.Barrier(threads + 1)
    old = sys.getswitchinterval()

    def report(worker: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            counter._record(f"op{worker}.{i}", 1)

    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=report, args=(w,)) for w in range(threads)]
        for t in workers:
            t.start()
        barrier.wait()
        while any(t.is_alive() for t in workers):
            snapshot = counter.breakdown()
            assert sum(f.total for f in snapshot.by_op.values()) == snapshot.total_flops
        for t in workers:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert counter.get_flops() == [threads * per_thread] * 2


def test_stop_from_another_thread_raises(counter: FlopsCounter) -> None:
    """stop() must run on the thread that called start(); the counter keeps running otherwise."""
    counter.start()
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            counter.stop()
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=stop)
    t.start()
    t.join()
    assert len(errors) == 1 and "thread" in str(errors[0])
    assert counter.is_running
    counter.stop()


def test_misuse_errors(counter: FlopsCounter) -> None:
    """Double start, stop without start, bad compile_mode and out-of-order stop raise clearly."""
    with pytest.raises(RuntimeError, match="not running"):
        counter.stop()
    with pytest.raises(ValueError, match="compile_mode"):
        counter.start(compile_mode="fast")  # type: ignore[arg-type]
    counter.start()
    with pytest.raises(RuntimeError, match="already running"):
        counter.start()
    with FlopCounterMode(display=False):
        with pytest.raises(RuntimeError, match="_FlopCounterMode"):
            counter.stop()
    counter.stop()
    assert not counter.is_running


def test_failed_start_rolls_back(counter: FlopsCounter) -> None:
    """A start() that fails half-way leaves no mode, module session or compiler stance behind."""
    from torch._dynamo.testing import CompileCounter

    from torchaux.training.flops.modules import ModuleScopes

    with ModuleScopes(), pytest.raises(RuntimeError, match="ModuleScopes"):
        counter.start(by_module=True, compile_mode="eager")
    assert not counter.is_running
    backend = CompileCounter()
    torch.compile(lambda t: t + 1, backend=backend)(torch.ones(2))
    assert backend.frame_count == 1  # not stuck in the "force_eager" stance
    assert _count(counter, lambda: torch.ones(3, 4) @ torch.ones(4, 3), by_module=True) == [72, 72]


def test_custom_op_formula(counter: FlopsCounter) -> None:
    """A custom op counts only once a formula is registered; bad registrations raise."""
    lib = torch.library.Library("torchaux_flops_test", "DEF")
    lib.define("scale(Tensor x) -> Tensor")
    lib.impl("scale", lambda x: x * 2, "CompositeExplicitAutograd")
    op = torch.ops.torchaux_flops_test.scale
    x = torch.ones(3, 5)
    assert _count(counter, lambda: op(x)) == [0, 0]
    register_formula(op, lambda args, kwargs, out: out.numel())
    assert _count(counter, lambda: op(x)) == [15, 15]
    with pytest.raises(ValueError, match="replace=True"):
        register_formula(op.default, lambda args, kwargs, out: 0)
    with pytest.raises(TypeError, match="torch.ops"):
        register_formula("aten::mm", lambda args, kwargs, out: 0)


# -- breakdown and overhead ------------------------------------------------------------


def test_breakdown_table_and_module_switch(counter: FlopsCounter) -> None:
    """The table lists modules down to `depth`; without by_module the module map is empty."""
    step = PARITY_MODELS["mlp-3d-input"]
    _count(counter, step(), by_module=True)
    breakdown = counter.breakdown()
    assert breakdown.module_flops()["Sequential"].total == breakdown.total_flops
    assert "Sequential.0" in breakdown.table(depth=2)
    assert "Sequential.0" not in breakdown.table(depth=1)
    _count(counter, step())
    assert counter.breakdown().by_module == {} and counter.breakdown().total_flops > 0


def test_measure_overhead(counter: FlopsCounter) -> None:
    """measure_overhead reports ratios and one step's FLOPs, restores threads, needs the counter."""
    threads = torch.get_num_threads()
    result = measure_overhead(steps=2, warmup=0, width=16, seq_len=8, batch_size=2, layers=1,
                              threads=1)
    assert result["threads"] == 1 and torch.get_num_threads() == threads
    assert result["ratio"] > 0
    assert result["total_flops_per_step"] == result["model_flops_per_step"] > 0
    assert not counter.is_running
    counter.start()
    with pytest.raises(RuntimeError, match="stop"):
        measure_overhead(steps=1)
    counter.stop()


# -- lifecycle and attribution (review findings f4, f5, f6, f17) --------------------------


def test_start_keeps_a_pending_pause_and_stop_clears_it(counter: FlopsCounter) -> None:
    """torch_npu: start() does not touch the pause flag; stop() resets it (FlopCounter.cpp)."""
    a, b = torch.ones(3, 4), torch.ones(4, 3)
    counter.pause()
    counter.start()
    _ = a @ b
    assert counter.is_paused
    counter.stop()
    assert counter.get_flops() == [0, 72]
    assert not counter.is_paused
    counter.start()
    _ = a @ b
    counter.stop()
    assert counter.get_flops() == [72, 72]


def test_counter_whose_thread_exited_can_be_stopped_reset_and_restarted(
    counter: FlopsCounter,
) -> None:
    a, b = torch.ones(3, 4), torch.ones(4, 3)

    def start_and_exit() -> None:
        counter.start()
        _ = a @ b

    t = threading.Thread(target=start_and_exit)
    t.start()
    t.join()
    assert not counter.is_running
    assert counter.get_flops() == [72, 72]
    counter.stop()  # from another thread: ends the orphaned session, keeps the counts
    assert counter.get_flops() == [72, 72]
    t = threading.Thread(target=start_and_exit)
    t.start()
    t.join()
    counter.reset()
    assert counter.get_flops() == [0, 0] and not counter.is_running
    t = threading.Thread(target=start_and_exit)
    t.start()
    t.join()
    counter.start()  # a new start() takes over from the dead thread's session
    _ = a @ b
    counter.stop()
    assert counter.get_flops() == [72, 72]


def test_module_breakdown_ignores_other_threads_modules(counter: FlopsCounter) -> None:
    """A module running on a background thread is not charged with the step's FLOPs."""
    inside, release = threading.Event(), threading.Event()

    class Waiter(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            inside.set()
            release.wait()
            return x

    counter.start(by_module=True)
    t = threading.Thread(target=lambda: Waiter()(torch.ones(1)))
    t.start()
    inside.wait()  # the background module's forward is open while the step runs
    try:
        net, x = nn.Sequential(nn.Linear(8, 8)), torch.randn(4, 8)
        net(x)
    finally:
        release.set()
        t.join()
        counter.stop()
    modules = counter.breakdown().module_flops()
    assert set(modules) == {"Global", "Sequential", "Sequential.0"}
    assert modules["Sequential"].total == modules["Global"].total == 2 * 4 * 8 * 8


def test_module_scope_closes_when_forward_raises(counter: FlopsCounter) -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.fc(x)
            raise RuntimeError("simulated OOM")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.boom, self.head = Boom(), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, use_boom: bool = True) -> torch.Tensor:
            out: torch.Tensor = self.head(self.boom(x) if use_boom else x)
            return out

    net, x = Net(), torch.randn(4, 8)
    counter.start(by_module=True)
    with pytest.raises(RuntimeError, match="simulated"):
        net(x)
    net(x, use_boom=False)
    counter.stop()
    modules = {k: v.total for k, v in counter.breakdown().module_flops().items()}
    assert modules == {"Global": 1024, "Net": 1024, "Net.boom": 512, "Net.boom.fc": 512,
                       "Net.head": 512}  # fmt: skip


# -- checkpoint_contexts under torch.compile (review findings f13, f14) -------------------


def _compiled_checkpoint(context_fn: Callable[[], object], backend: str) -> Callable[..., object]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)

    def step(x: torch.Tensor) -> torch.Tensor:
        out = checkpoint(lambda y: layer(y).relu(), x, use_reentrant=False, context_fn=context_fn)
        return out.sum()  # type: ignore[no-any-return,union-attr]

    return torch.compile(step, backend=backend, fullgraph=True)


@pytest.mark.parametrize("as_lambda", [False, True])
def test_checkpoint_contexts_under_compile_raise_a_clear_error(
    counter: FlopsCounter, as_lambda: bool
) -> None:
    context_fn = (lambda: counter.checkpoint_contexts()) if as_lambda else counter.checkpoint_contexts
    step = _compiled_checkpoint(context_fn, "aot_eager")
    with pytest.raises(Exception, match="compile_mode='eager'"):
        step(torch.randn(4, 16, requires_grad=True)).backward()  # type: ignore[union-attr]
    torch._dynamo.reset()


def test_checkpoint_contexts_in_compiled_code_split_with_compile_mode_eager(
    counter: FlopsCounter,
) -> None:
    """What the docs offer instead: counting with compile_mode='eager' keeps the exact split."""
    step = _compiled_checkpoint(counter.checkpoint_contexts, "aot_eager")
    x = torch.randn(4, 16, requires_grad=True)
    counter.start(compile_mode="eager")
    step(x).backward()  # type: ignore[union-attr]
    counter.stop()
    forward = 2 * 4 * 16 * 16
    assert counter.get_flops() == [3 * forward, 4 * forward]  # fwd + 2 bwd mm; + recompute
    torch._dynamo.reset()


@pytest.mark.slow
def test_checkpoint_contexts_under_inductor_raise_a_clear_error(counter: FlopsCounter) -> None:
    step = _compiled_checkpoint(counter.checkpoint_contexts, "inductor")
    with pytest.raises(Exception, match="compile_mode='eager'"):
        step(torch.randn(4, 16, requires_grad=True)).backward()  # type: ignore[union-attr]
    torch._dynamo.reset()
