"""`torchaux bench`: checkpoint a small training run with every method, side by side.

One process trains the same deterministic model once per method (same seed,
same synthetic batches), saving every ``every`` steps.  Per method it reports:

* stall per save: time the training thread is blocked (inside the save call,
  waiting for back-pressure, or in ``model=`` fences, a save's fence waits
  being those of the steps until the next save); first save separately,
  steady state as the median of the others;
* loop overhead per save: extra wall time of the whole loop against the mean
  of two loops without saves run just before and just after it in the same
  process (includes CPU contention from background writers);
* time until durable: from the save call until the bytes are fsynced;
* peak extra RSS over the loop;
* consistency: every file equals the state at its step, checked against
  fingerprints from a reference pass without saves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from torchaux.checkpoint.cpu_time import background_cpu_seconds
from torchaux.checkpoint.engine.staging import fence_blocked_seconds
from torchaux.cli.bench.measure import RssSampler, fingerprint
from torchaux.cli.bench.methods import METHODS, Method
from torchaux.cli.bench.secure import SECURE_METHODS, writer_probe

__all__ = ["BenchConfig", "run_bench"]

_MIB = 1 << 20
# Adam keeps two moments per parameter (torch.optim.Adam), so the saved state
# is three fp32 copies of the parameters: 12 bytes per parameter.
_STATE_BYTES_PER_PARAM = 12
_LAYERS = 4


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What `torchaux bench` runs (all fields are CLI options)."""

    size_mib: int = 256
    steps: int = 30
    every: int = 5
    batch: int = 128
    directory: str | None = None
    device: str = "auto"
    methods: tuple[str, ...] = tuple(METHODS)
    seed: int = 0
    #: also run the writer-only throughput probe of the secure modes
    writer_probe: bool = False
    #: torchaux methods warm their pool with saver.prepare before the timed loop
    prepare: bool = False

    def __post_init__(self) -> None:
        if self.size_mib < 1:
            raise ValueError(f"--size-mib must be >= 1, got {self.size_mib}")
        if self.every < 1 or self.steps < self.every:
            raise ValueError(
                f"need 1 <= --every <= --steps, got every={self.every} steps={self.steps}"
            )
        known = {**METHODS, **SECURE_METHODS}
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(known)}")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    return device


def _build(cfg: BenchConfig, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = max(8, int((cfg.size_mib * _MIB / _STATE_BYTES_PER_PARAM / _LAYERS) ** 0.5))
    torch.manual_seed(cfg.seed)
    layers: list[torch.nn.Module] = []
    for i in range(_LAYERS):
        layers.append(torch.nn.Linear(width, width))
        if i < _LAYERS - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, optimizer


def _batch(cfg: BenchConfig, step: int, width: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
    return torch.randn(cfg.batch, width, generator=gen).to(device)


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def _train(
    cfg: BenchConfig,
    device: torch.device,
    on_save: Callable[[int, dict[str, Any], torch.nn.Module], None] | None,
    after_first_step: Callable[[], None] = lambda: None,
) -> tuple[float, torch.nn.Module, torch.optim.Optimizer]:
    """Run the training loop; call ``on_save`` at save steps.

    Returns:
        Loop seconds, and the trained model and optimizer (gradients kept).
    """
    model, optimizer = _build(cfg, device)
    width = model[0].in_features
    loss_fn = torch.nn.MSELoss()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for step in range(cfg.steps):
        x = _batch(cfg, step, width, device)
        loss = loss_fn(model(x), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0:
            after_first_step()
        if on_save is not None and (step + 1) % cfg.every == 0:
            on_save(step, _state(model, optimizer), model)
    sync()
    return time.perf_counter() - start, model, optimizer


def _method_dir(root: str, name: str) -> str:
    return os.path.join(root, name.replace(" ", "_").replace("(", "").replace(")", ""))


def run_one(cfg: BenchConfig, name: str | None, root: str,
            reference: dict[int, list[tuple[str, int]]]) -> dict[str, Any]:
    """Train once with method ``name`` (``None``: no saves) and measure it.

    Runs in a fresh process per method (see :func:`run_bench`), so peak RSS is
    the method's own: growth over the RSS right after the first training step,
    when parameters, gradients and Adam moments all exist.
    """
    device = _resolve_device(cfg.device)
    method: Method | None = None
    if name is not None:
        directory = _method_dir(root, name)
        os.makedirs(directory, exist_ok=True)
        method = {**METHODS, **SECURE_METHODS}[name](directory)
    stalls: list[float] = []
    fenced: list[float] = []  # fence_blocked_seconds() after each save call

    def on_save(step: int, state: dict[str, Any], model: torch.nn.Module) -> None:
        assert method is not None
        if fenced:  # the fence waits since the previous save belong to it
            fenced[-1] = fence_blocked_seconds() - fenced[-1]
        start = time.perf_counter()
        method.save(step, state, model)
        stalls.append(time.perf_counter() - start)
        fenced.append(fence_blocked_seconds())
        method.after_save()

    paired: list[float] = []
    if method is not None:
        # A loop without saves right before the measured one (and another right
        # after): the overhead is taken against their mean, in this process, so
        # the host's drift between processes minutes apart cancels out.  A short
        # untimed loop first: a process's first model and optimizer state land in
        # fresh memory, later ones in memory the allocator recycled, which ran
        # up to 30% slower here; every timed loop then starts from the latter.
        _train(dataclasses.replace(cfg, steps=2, every=2), device, None)
        paired.append(_train(cfg, device, None)[0])
        if cfg.prepare:
            method.prepare(_template(cfg, device))
    fences_before = fence_blocked_seconds()
    cpu_before = background_cpu_seconds()
    with RssSampler() as rss:
        loop_s, model, optimizer = _train(
            cfg, device, on_save if method else None, after_first_step=rss.rebase
        )
        if method is not None:
            method.finish()
            if fenced:
                fenced[-1] = fence_blocked_seconds() - fenced[-1]
    result: dict[str, Any] = {
        "method": name,
        "loop_s": loop_s,
        "paired_baseline_s": paired,
        "peak_extra_rss_mib": (rss.peak - rss.base) / _MIB,
    }
    if method is None:
        return result
    fence_s = fence_blocked_seconds() - fences_before
    background_cpu_s = background_cpu_seconds() - cpu_before
    state_gib = sum(p.nbytes for p in model.parameters()) * 3 / (1 << 30)
    paired.append(_train(cfg, device, None)[0])
    exact_at_call = _probe_immediate_step(cfg, method, model, optimizer)
    method.close()
    saves = len(stalls)
    # A save's fence waits happen in the training steps after it (until the
    # next save): each save is charged its own, so a slow first save shows.
    stalls = [s + f for s, f in zip(stalls, fenced)]
    consistent = [
        fingerprint(method.load(step, lambda: _template(cfg))) == reference[step]
        for step in sorted(method.paths) if step in reference
    ]
    durable = [method.durable_s[s] for s in sorted(method.durable_s) if s in reference]
    result.update({
        "saves": saves,
        "stall_first_s": stalls[0],
        "stall_steady_s": statistics.median(stalls[1:]) if saves > 1 else stalls[0],
        "stall_mean_s": statistics.fmean(stalls),
        "fence_wait_s": fence_s,
        # torchaux's background threads only (cpu_time.py); 0 for other methods
        "background_cpu_s_per_gib": (
            background_cpu_s / (saves * state_gib) if background_cpu_s > 0 else None
        ),
        "durable_steady_s": statistics.median(durable[1:]) if len(durable) > 1 else durable[0],
        "durable_mean_s": statistics.fmean(durable),
        "consistent_files": sum(consistent),
        "all_consistent": all(consistent),
        "exact_at_call": exact_at_call,
    })
    return result


def _probe_immediate_step(cfg: BenchConfig, method: Method, model: torch.nn.Module,
                          optimizer: torch.optim.Optimizer) -> bool:
    """Save, then step the optimizer at once: does the file hold the state at the call?

    The training loop leaves a forward and backward between a save and the
    next parameter update, which hides methods that read live tensors while
    writing.  Here the update comes immediately (the gradients of the last
    step are still there), as it would with gradient accumulation or a
    save placed right before ``optimizer.step()``.
    """
    step = -1
    state = _state(model, optimizer)
    expected = fingerprint(state)
    method.save(step, state, model)
    method.after_save()
    optimizer.step()
    method.finish()
    return fingerprint(method.load(step, lambda: _template(cfg))) == expected


def _in_child(cfg: BenchConfig, name: str | None, root: str,
              reference: dict[int, list[tuple[str, int]]]) -> dict[str, Any]:
    payload = json.dumps({
        "cfg": dataclasses.asdict(cfg), "method": name, "root": root,
        "reference": {str(k): v for k, v in reference.items()},
    })
    proc = subprocess.run(
        [sys.executable, "-m", "torchaux.cli.bench.child"], input=payload,
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench child for {name!r} failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _template(cfg: BenchConfig, device: torch.device | None = None) -> dict[str, Any]:
    """A state with the right structure (DCP loads in place into one), on the CPU by default."""
    model, optimizer = _build(cfg, device or torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the Adam moments DCP will overwrite
    return _state(model, optimizer)


def _reference(cfg: BenchConfig, device: torch.device) -> dict[int, list[tuple[str, int]]]:
    prints: dict[int, list[tuple[str, int]]] = {}

    def on_save(step: int, state: dict[str, Any], model: torch.nn.Module) -> None:
        prints[step] = fingerprint(state)

    _train(cfg, device, on_save)
    return prints


def _add_ratios(results: list[dict[str, Any]]) -> None:
    base = next((r for r in results if r["method"] == "torch.save"), None)
    plain = next((r for r in results if r["method"] == "torchaux.save_async"), None)
    for r in results:
        if base is not None:
            r["stall_vs_torch_save"] = r["stall_steady_s"] / base["stall_steady_s"]
            r["loop_overhead_vs_torch_save"] = (
                r["loop_overhead_per_save_s"] / base["loop_overhead_per_save_s"]
                if base["loop_overhead_per_save_s"] > 0 else float("nan")
            )
            r["durable_vs_torch_save_fsync"] = r["durable_steady_s"] / base["durable_steady_s"]
        if plain is not None and r["method"] in SECURE_METHODS:
            # Issue #3's bars compare secure saves with the plain async save.
            r["stall_vs_plain_async"] = r["stall_steady_s"] / plain["stall_steady_s"]
            r["loop_overhead_vs_plain_async"] = (
                r["loop_overhead_per_save_s"] / plain["loop_overhead_per_save_s"]
                if plain["loop_overhead_per_save_s"] > 0 else float("nan")
            )
            r["durable_speed_vs_plain_async"] = plain["durable_steady_s"] / r["durable_steady_s"]


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run every configured method; return machine-readable results.

    Example:
        >>> cfg = BenchConfig(size_mib=1, steps=4, every=2, directory=doctest_tmp,
        ...                   methods=("torch.save", "torchaux.save_async"))
        >>> res = run_bench(cfg)
        >>> [r["all_consistent"] for r in res["methods"]]
        [True, True]
    """
    device = _resolve_device(cfg.device)
    root = tempfile.mkdtemp(prefix="torchaux-bench-", dir=cfg.directory)
    try:
        model, _ = _build(cfg, device)
        state_bytes = sum(t.nbytes for t in model.parameters()) * 3
        del model
        log(f"state {state_bytes / _MIB:.0f} MiB on {device}, {cfg.steps} steps, "
            f"save every {cfg.every}; reference pass")
        reference = _reference(cfg, device)
        # Every measured loop runs in a fresh process: peak memory and timings
        # then belong to that method alone, not to what earlier passes left.
        baseline = min((_in_child(cfg, None, root, reference) for _ in range(2)),
                       key=lambda r: r["loop_s"])
        log(f"baseline loop {baseline['loop_s']:.2f} s")
        results = []
        for name in cfg.methods:
            log(f"running {name}")
            r = _in_child(cfg, name, root, reference)
            # The child has verified its files; delete them now, so their page
            # cache and blocks do not burden the methods measured after it.
            shutil.rmtree(_method_dir(root, name), ignore_errors=True)
            os.sync()
            r["loop_overhead_per_save_s"] = (
                r["loop_s"] - statistics.fmean(r["paired_baseline_s"])
            ) / r["saves"]
            r["peak_extra_rss_mib"] -= baseline["peak_extra_rss_mib"]
            results.append(r)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _add_ratios(results)
    probe = None
    if cfg.writer_probe:
        probe_dir = tempfile.mkdtemp(prefix="torchaux-probe-", dir=cfg.directory)
        try:
            probe = writer_probe(cfg.size_mib, probe_dir, log)
        finally:
            shutil.rmtree(probe_dir, ignore_errors=True)
    return {
        "writer_probe": probe,
        "config": dataclasses.asdict(cfg),
        "device": str(device),
        "state_mib": state_bytes / _MIB,
        "baseline_loop_s": baseline["loop_s"],
        "baseline_peak_extra_rss_mib": baseline["peak_extra_rss_mib"],
        "torch_version": torch.__version__,
        "cpu_count": os.cpu_count(),
        "methods": results,
    }
