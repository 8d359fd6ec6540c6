"""``FlopsCounter``: torch_npu's process-wide FLOPs counter, for every backend.

Why: torch_npu counts FLOPs in its NPU kernel wrappers, so it works only on
Ascend; ``torch.utils.flop_counter.FlopCounterMode`` works everywhere but misses
the CPU attention kernels (pytorch issue #195460), has no notion of
recomputation, and makes Dynamo skip -- and cache the skip of -- every frame
first run under it (issue #190286).  This counter intercepts ATen calls with a
``TorchDispatchMode`` (which autograd carries into backward, so backward
kernels are counted too) and keeps torch_npu's API and its two totals.

Differences from torch_npu, on purpose:

* ``stop()`` keeps the values readable; ``start()`` and ``reset()`` zero them
  (torch_npu's ``stop()`` zeroes them, so results must be read before it).
  As there, ``start()`` keeps a pending ``pause()`` and ``stop()`` clears it.
* ``start()`` and ``stop()`` must run on the same thread: a dispatch mode lives
  on the calling thread's mode stack (autograd's worker threads inherit it
  during backward; other threads you start are not counted).  If the thread
  that started the counter exits without ``stop()``, its mode dies with it:
  the counter then reports ``is_running == False`` and ``stop()``,
  ``reset()`` or a new ``start()`` from any thread end that session.
* A matmul-class operator without a formula (see ``coverage.py``) is never
  dropped silently: it is listed in ``breakdown().uncounted`` and warned
  about once per process.
* Attention counts 2 FLOPs per multiply-add like matmuls (``formulas.py``).

torch.compile: the mode declares ``ignore_compile_internals()``, so Dynamo
compiles normally (no skip is cached, nothing recompiles after ``stop()``; the
module hooks of ``by_module=True`` are inert under Dynamo, see ``modules.py``)
and the counter sees the ATen calls the compiled code makes at run time.  On CPU
that equals eager counting; kernels fused by Inductor into Triton or C++
templates, and CUDA-graph replays, bypass the dispatcher and are not seen.  For
those, ``start(compile_mode="eager")`` runs compiled functions eagerly while
counting (``torch.compiler.set_stance("force_eager")``, restored by ``stop()``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Literal

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from torchaux.training.flops.breakdown import FlopsBreakdown, OpFlops, Tally
from torchaux.training.flops.coverage import warn_uncounted_once
from torchaux.training.flops.dispatch_mode import CountingMode
from torchaux.training.flops.modules import ModuleScopes

__all__ = ["FlopsCounter"]


class FlopsCounter:
    """Process-wide counter of matmul-class FLOPs, forward and backward.

    ``FlopsCounter()`` always returns the same object (as torch_npu's does), so
    a training loop and a callback deep in a library share one count.

    Counted: ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``addbmm``, ``mv``,
    ``addmv``, ``dot`` (so ``matmul``, ``linear`` and ``einsum``, which lower to
    them), convolutions and their backward, and every fused attention kernel,
    including the CPU ones, plus ``flex_attention`` in eager mode.  Formulas
    equal ``torch.utils.flop_counter``'s where it counts; see ``formulas.py``.

    Example:
        >>> import torch
        >>> counter = FlopsCounter()
        >>> a, b = torch.ones(3, 4), torch.ones(4, 3)
        >>> counter.start()
        >>> _ = a @ b
        >>> counter.pause()                  # e.g. around activation recomputation
        >>> _ = a @ b
        >>> counter.resume()
        >>> counter.stop()
        >>> counter.get_flops()              # [model FLOPs, all FLOPs]
        [72, 144]
    """

    _instance: ClassVar[FlopsCounter | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    _lock: threading.Lock
    _tls: threading.local
    _tally: Tally
    _paused: bool
    _detect_recompute: bool
    _mode: CountingMode | None
    _tracker: ModuleScopes | None
    _stance: Any
    _owner: int | None
    _owner_thread: threading.Thread | None

    def __new__(cls) -> FlopsCounter:
        with cls._instance_lock:
            if cls._instance is None:
                self = super().__new__(cls)
                self._lock = threading.Lock()
                self._tls = threading.local()
                self._tally = Tally()
                self._paused = False
                self._detect_recompute = False
                self._mode = None
                self._tracker = None
                self._stance = None
                self._owner = None
                self._owner_thread = None
                cls._instance = self
            return cls._instance

    # -- torch_npu surface ---------------------------------------------------------------

    def start(
        self,
        *,
        by_module: bool = False,
        detect_recompute: bool = False,
        compile_mode: Literal["runtime", "eager"] = "runtime",
    ) -> None:
        """Start counting from zero on the calling thread (and its backward passes).

        Args:
            by_module: also attribute FLOPs to ``nn.Module``s for
                :meth:`breakdown`.  Off by default: it costs a few microseconds
                per module call while counting, and the first use installs two
                global module hooks for the life of the process (inert when not
                counting and invisible to torch.compile; see ``modules.py``).
            detect_recompute: treat ops that run inside backward with grad mode
                on as recomputation (excluded from model FLOPs).  That is what
                ``torch.utils.checkpoint`` recomputation looks like, reentrant or
                not, but a backward with ``create_graph=True`` looks the same and
                would be misclassified; precise alternatives are
                :meth:`checkpoint_contexts` and :meth:`pause`.
            compile_mode: ``"runtime"`` counts what compiled code dispatches;
                ``"eager"`` runs compiled functions eagerly while counting.

        Raises:
            RuntimeError: the counter is already running.
            ValueError: unknown ``compile_mode``.
        """
        if compile_mode not in ("runtime", "eager"):
            raise ValueError(
                f"compile_mode must be 'runtime' or 'eager', got {compile_mode!r}"
            )
        with self._lock:
            self._end_orphaned_session()
            if self._mode is not None:
                raise RuntimeError(
                    f"FlopsCounter is already running (started on thread {self._owner}); "
                    "call stop() first, or reset() to zero it while it runs"
                )
            tracker = ModuleScopes() if by_module else None
            mode = CountingMode(self._record, self._note_uncounted)
            stance = None
            try:
                if compile_mode == "eager":
                    # set_stance applies on construction; its __exit__ restores the
                    # previous stance (torch/_dynamo/decorators.py, torch 2.13).
                    stance = torch.compiler.set_stance("force_eager")
                if tracker is not None:
                    tracker.__enter__()
                mode.__enter__()  # type: ignore[no-untyped-call]
            except BaseException:
                if stance is not None:
                    stance.__exit__(None, None, None)
                if tracker is not None:
                    tracker.__exit__()
                raise
            self._tally = Tally()
            # A pending pause() survives start(), as in torch_npu (FlopCounter.cpp).
            self._detect_recompute = detect_recompute
            self._owner = threading.get_ident()
            self._owner_thread = threading.current_thread()
            self._tracker, self._stance, self._mode = tracker, stance, mode

    def stop(self) -> None:
        """Stop counting; the values stay readable until ``start()`` or ``reset()``.

        Also clears a pending :meth:`pause` (as torch_npu's ``stop()`` does).
        Any thread may stop a counter whose starting thread has exited.

        Raises:
            RuntimeError: not running, called from another thread than
                ``start()`` while that thread is alive, or another dispatch mode
                entered after ``start()`` is still active (modes must be exited
                in reverse order).
        """
        with self._lock:
            if self._end_orphaned_session():
                self._paused = False
                return
            if self._mode is None:
                raise RuntimeError("FlopsCounter is not running; call start() first")
            if threading.get_ident() != self._owner:
                raise RuntimeError(
                    f"FlopsCounter.stop() called on thread {threading.get_ident()} but "
                    f"start() ran on thread {self._owner}; call stop() on that thread "
                    "(dispatch modes are per thread)"
                )
            top = _get_current_dispatch_mode()
            if top is not self._mode:
                raise RuntimeError(
                    f"FlopsCounter.stop(): expected its mode on top of the dispatch mode "
                    f"stack, found {type(top).__name__}; exit modes entered after start() "
                    "before calling stop()"
                )
            self._mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            self._close_session()
            self._paused = False

    def _close_session(self) -> None:
        """Release what ``start()`` set up besides the mode (caller holds the lock)."""
        self._mode = None
        if self._tracker is not None:
            self._tracker.__exit__()
            self._tracker = None
        if self._stance is not None:
            self._stance.__exit__(None, None, None)
            self._stance = None
        self._owner = None
        self._owner_thread = None

    def _end_orphaned_session(self) -> bool:
        """End a session whose starting thread exited; True if there was one.

        The mode lived on that thread's dispatch stack, which died with it, so
        nothing can be counted any more; the counts stay readable.
        """
        thread = self._owner_thread
        if self._mode is None or thread is None or thread.is_alive():
            return False
        self._close_session()
        return True

    def pause(self) -> None:
        """Exclude what runs from now on from model FLOPs (it still adds to total FLOPs).

        Process-wide, like torch_npu's: it also affects autograd threads.
        """
        self._paused = True

    def resume(self) -> None:
        """Count model FLOPs again after :meth:`pause`."""
        self._paused = False

    def reset(self) -> None:
        """Zero all counts and the breakdown; a running counter keeps running.

        A session whose starting thread exited is ended (see :meth:`stop`).

        Example:
            >>> counter = FlopsCounter()
            >>> counter.reset()
            >>> counter.get_flops()
            [0, 0]
        """
        with self._lock:
            self._end_orphaned_session()
            self._tally = Tally()

    def get_flops(self) -> list[int]:
        """``[model_flops, total_flops]``: without and with paused/recomputed work.

        The order and meaning are torch_npu's ``[recorded, traversed]``: model
        FLOPs feed MFU, total FLOPs feed HFU (hardware FLOPs utilisation).
        """
        with self._lock:
            return [self._tally.model, self._tally.total]

    # -- extras --------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        """Whether ``start()`` was called without a matching ``stop()`` on a living thread."""
        thread = self._owner_thread
        return self._mode is not None and thread is not None and thread.is_alive()

    @property
    def is_paused(self) -> bool:
        """Whether model counting is paused by :meth:`pause`."""
        return self._paused

    def breakdown(self) -> FlopsBreakdown:
        """A consistent snapshot of the counts per operator and per module."""
        with self._lock:
            tally = self._tally
            return FlopsBreakdown(
                model_flops=tally.model,
                total_flops=tally.total,
                by_op={op: OpFlops(*v) for op, v in tally.by_op.items()},
                by_module={
                    name: {op: OpFlops(*v) for op, v in ops.items()}
                    for name, ops in tally.by_module.items()
                },
                uncounted=tuple(sorted(tally.uncounted)),
            )

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Pause within a ``with`` block, restoring the previous pause state after it."""
        previous = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = previous

    @contextlib.contextmanager
    def recompute_context(self) -> Iterator[None]:
        """Mark ops run by this thread inside the block as recomputation (total FLOPs only)."""
        self._tls.recompute_depth = getattr(self._tls, "recompute_depth", 0) + 1
        try:
            yield
        finally:
            self._tls.recompute_depth -= 1

    @staticmethod
    def checkpoint_contexts() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
        """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: exact recompute split.

        ``checkpoint(fn, x, use_reentrant=False, context_fn=counter.checkpoint_contexts)``
        wraps exactly the recomputation in :meth:`recompute_context`.

        Under ``torch.compile`` it raises instead of miscounting: AOTAutograd
        calls ``context_fn`` once while tracing, and the recomputation becomes
        part of the compiled backward, indistinguishable at run time (torch
        2.13 ``_higher_order_ops/wrap.py``).  What works instead:
        ``start(compile_mode="eager")`` (compiled code runs eagerly while
        counting; the split is exact), or no ``context_fn`` (recomputation then
        counts as model FLOPs).  Static, so Dynamo sees a plain function (a
        bound method loses ``self`` in Dynamo's checkpoint handling).

        Raises:
            RuntimeError: called while torch.compile traces the checkpoint.
        """
        # AOTAutograd traces the checkpoint under a proxy dispatch mode; the same
        # test torch.utils.checkpoint uses (_is_compiling, torch 2.13).
        tracing = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None
        if torch.compiler.is_compiling() or tracing:
            raise RuntimeError(
                "FlopsCounter.checkpoint_contexts cannot mark recomputation inside "
                "torch.compile (it becomes part of the compiled backward); count this step "
                "with counter.start(compile_mode='eager') for the exact split, or drop "
                "context_fn (recomputation then counts as model FLOPs)."
            )
        return contextlib.nullcontext(), FlopsCounter().recompute_context()

    def __enter__(self) -> FlopsCounter:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        model, total = self.get_flops()
        state = "running" if self.is_running else "stopped"
        return f"FlopsCounter({state}, model_flops={model}, total_flops={total})"

    # -- called by the mode --------------------------------------------------------------

    def _is_recompute(self) -> bool:
        if self._paused or getattr(self._tls, "recompute_depth", 0) > 0:
            return True
        # In backward (a graph task runs on this thread) with grad mode on: the
        # signature of checkpoint recomputation; true backward kernels run with
        # grad off unless create_graph=True (torch/csrc/autograd/engine.cpp).
        return (
            self._detect_recompute
            and torch._C._current_graph_task_id() != -1
            and torch.is_grad_enabled()
        )

    def _record(self, op: str, flops: int) -> None:
        model = not self._is_recompute()
        tracker = self._tracker
        modules = tracker.current() if tracker is not None else ()
        with self._lock:
            self._tally.add(op, int(flops), model=model, modules=modules)

    def _note_uncounted(self, op: str) -> None:
        with self._lock:
            self._tally.uncounted.add(op)
        warn_uncounted_once(op)
