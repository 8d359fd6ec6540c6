"""How much slower a CPU training step runs while :class:`FlopsCounter` counts it.

Why: the counter runs a Python handler for *every* ATen call of the step
(views and elementwise ops included), so its cost depends on how many ops a
step makes per unit of compute.  Users decide whether to count every step or
a few, so we measure instead of guessing: the same step, same process, same
inputs, timed with and without the counter in alternating steps (so load from
other processes, clock drift and cache state hit both sides alike).

The model is a small pre-norm transformer block with a convolution in front
(conv1d, four linears, causal SDPA, layer norms, GELU) trained with SGD; its
matmul-class kernels are what the counter counts, and its share of cheap ops is
typical of small models.  Bigger widths make the ratio approach 1.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from torchaux.training.flops.counter import FlopsCounter

__all__ = ["measure_overhead"]


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=1)
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        qkv = self.qkv(self.norm1(x)).view(batch, seq, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, width))
        out: torch.Tensor = x + self.down(F.gelu(self.up(self.norm2(x))))
        return out


def _seconds(step: Callable[[], None]) -> float:
    begin = time.perf_counter()
    step()
    return time.perf_counter() - begin


def measure_overhead(
    *,
    steps: int = 30,
    warmup: int = 3,
    batch_size: int = 8,
    seq_len: int = 64,
    width: int = 128,
    layers: int = 2,
    by_module: bool = False,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Time a CPU training step with and without the counter; return the ratio.

    Steps rotate between three sides -- plain, counted (``start()`` before and
    ``stop()`` after each step, outside the timed region) and, for reference,
    torch's ``FlopCounterMode`` -- so load from other processes and clock drift
    hit all sides alike; ratios are of median step times.  Afterwards the
    counter is stopped and holds the FLOPs of one step.

    Args:
        steps: timed steps per side.
        warmup: untimed steps per side first (allocator and oneDNN caches).
        batch_size: sequences per batch.
        seq_len: tokens per sequence.
        width: model width (4 heads; must be divisible by 4).
        layers: transformer blocks.
        by_module: count with per-module attribution (``start(by_module=True)``).
        threads: intra-op threads while measuring (``torch.set_num_threads``,
            restored afterwards); None keeps the current setting.
        seed: seed for weights and inputs.

    Returns:
        ``baseline_step_s`` and ``counted_step_s`` (medians), ``ratio``
        (counted / baseline), ``flop_counter_mode_ratio`` (the same for
        ``FlopCounterMode``), ``added_us_per_op`` (extra time per ATen call),
        ``model_flops_per_step``, ``total_flops_per_step``, ``ops_per_step``
        (ATen calls the counter sees per step), ``threads`` and ``steps``.

    Raises:
        RuntimeError: the counter is already running (the benchmark needs it).
        ValueError: a non-positive size or ``width`` not divisible by 4.

    Example:
        >>> result = measure_overhead(steps=2, warmup=0, width=8, seq_len=4, batch_size=1,
        ...                           layers=1)
        >>> result["ratio"] > 0 and result["total_flops_per_step"] > 0
        True
    """
    sizes = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "width": width,
             "layers": layers, "threads": 1 if threads is None else threads}
    bad = {name: value for name, value in sizes.items() if value < 1}
    if bad or warmup < 0 or width % 4:
        raise ValueError(
            f"measure_overhead: sizes must be >= 1, warmup >= 0 and width divisible by 4; "
            f"got {sizes | {'warmup': warmup}}"
        )
    counter = FlopsCounter()
    if counter.is_running:
        raise RuntimeError("measure_overhead needs the FlopsCounter; stop() it first")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(*(_Block(width, heads=4) for _ in range(layers)))
        inputs = torch.randn(batch_size, seq_len, width)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(inputs).pow(2).mean().backward()
        optimizer.step()

    def counted() -> float:
        counter.start(by_module=by_module)
        try:
            return _seconds(step)
        finally:
            counter.stop()

    def upstream() -> float:
        with FlopCounterMode(display=False):
            return _seconds(step)

    def plain() -> float:
        return _seconds(step)

    sides = (plain, counted, upstream)
    times: list[list[float]] = [[], [], []]
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for side in sides * warmup:
            side()
        for i in range(steps):
            # Rotate the order every step so no side always follows another.
            for k in range(3):
                times[(i + k) % 3].append(sides[(i + k) % 3]())
        counted()
        model_flops, total_flops = counter.get_flops()
        ops = _count_ops(step)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    base_s, counted_s, upstream_s = (statistics.median(t) for t in times)
    return {
        "baseline_step_s": base_s,
        "counted_step_s": counted_s,
        "ratio": counted_s / base_s,
        "flop_counter_mode_ratio": upstream_s / base_s,
        "added_us_per_op": (counted_s - base_s) / ops * 1e6,
        "model_flops_per_step": model_flops,
        "total_flops_per_step": total_flops,
        "ops_per_step": ops,
        "threads": used_threads,
        "steps": steps,
    }


def _count_ops(step: Callable[[], None]) -> int:
    """ATen calls one step sends through a dispatch mode (what the counter pays for)."""
    calls = 0

    class _Calls(TorchDispatchMode):  # type: ignore[no-untyped-call]
        def __torch_dispatch__(
            self,
            func: Any,
            types: Any,
            args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None,
        ) -> Any:
            nonlocal calls
            calls += 1
            return func(*args, **(kwargs or {}))

    with _Calls():  # type: ignore[no-untyped-call]
        step()
    return calls
