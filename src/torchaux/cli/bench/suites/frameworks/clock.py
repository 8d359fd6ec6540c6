"""The clock of one framework training run: when each step began, and the checkpoint calls' seconds.

A framework callback calls :meth:`RunClock.step_begins` at the start of every
training step with the number of optimizer steps done so far (Lightning's
``trainer.global_step`` in ``on_train_batch_start``, the HF Trainer's
``state.global_step`` in ``on_step_begin``).  A checkpoint at step ``S`` is
written after step ``S``'s optimizer step and before the next step begins, so
it lies between ``begin[S - 1]`` and ``begin[S]``.

Two overheads per checkpoint come out of one run's clock:

* :meth:`RunClock.window` — from the begin of step ``every`` (after the first,
  cold, checkpoint) to the begin of step ``last - 1`` (before the last one):
  its seconds minus those of the same window of a run without checkpoints, per
  checkpoint inside it (the issue's "against a no-checkpoint run in the same
  process");
* :func:`paired_overheads` — within the run itself, each checkpoint interval
  of ``every`` steps is cut into three windows of ``w = every // 3`` steps: the
  *save* window (the checkpoint call and the steps right after it, where a
  background writer competes for the cores), a *gap* window (whatever of the
  write is left) and a *clean* window (no checkpoint activity).  One
  checkpoint's overhead is ``save + gap - 2 * clean``.  Adjacent windows of
  one run share the machine's state, so the drift between two runs (on the
  2-core VM, +-1 s on 7-10 s runs: docs/benchmarks.md section 17) cancels
  out; a write that outlasts its save and gap windows leaks into the clean
  window and is under-counted, which is why the time until durable is
  reported beside it.

>>> begin, t = {}, 0.0
>>> for g in range(12):  # 1 s a step; each checkpoint (every 3 steps) adds 0.5 s
...     begin[g] = t
...     t += 1.0 + (0.5 if (g + 1) % 3 == 0 else 0.0)
>>> paired_overheads(begin, every=3, steps=12)
[0.5, 0.5]
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

__all__ = ["RunClock", "paired_overheads", "timed_saves"]


class RunClock:
    """Step start times (by optimizer steps done) and the seconds spent in checkpoint calls.

    Checkpoint calls made while the current step is in ``[first, last - 1)``
    count as stall, and so do the seconds the training thread spent in
    torchaux's ``model=`` fences over the same steps.
    """

    def __init__(self, first: int, last: int) -> None:
        self.loop_start = 0.0
        self.begin: dict[int, float] = {}
        self.first, self.last = first, last
        self.current = -1
        self.stall = 0.0
        self._fenced = 0.0

    def step_begins(self, done: int) -> None:
        """Mark the start of the step after ``done`` optimizer steps."""
        from torchaux.checkpoint.engine.staging import fence_blocked_seconds

        now = time.perf_counter()
        if done == self.first:
            self._fenced = fence_blocked_seconds()
        elif done == self.last - 1:
            # Copies a training thread made itself in a model= fence are stall too.
            self.stall += fence_blocked_seconds() - self._fenced
        self.current = done
        self.begin.setdefault(done, now)

    def counting(self) -> bool:
        """True while checkpoint calls count as stall."""
        return self.first <= self.current < self.last - 1

    def window(self) -> float:
        """Seconds from the begin of step ``first`` to the begin of step ``last - 1``."""
        return self.begin[self.last - 1] - self.begin[self.first]

    def wrap(self, obj: Any, method: str) -> None:
        """Add the seconds of ``obj.method`` calls made while :meth:`counting` to ``stall``."""
        inner = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            counted, start = self.counting(), time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if counted:
                    self.stall += time.perf_counter() - start

        setattr(obj, method, timed)


def timed_saves(every: int, steps: int) -> list[int]:
    """The checkpoint steps whose three windows fit the run (the first, cold, one excluded).

    >>> timed_saves(15, 90)
    [30, 45, 60, 75]
    """
    w = every // 3
    return [s for s in range(2 * every, steps + 1, every) if s - 1 + 3 * w <= steps - 1]


def paired_overheads(begin: Mapping[int, float], *, every: int, steps: int) -> list[float]:
    """Seconds each timed checkpoint added: ``save + gap - 2 * clean`` windows (module docstring)."""
    if every < 3:
        raise ValueError(f"paired windows need every >= 3 steps (three windows); got every={every}")
    w = every // 3
    out = []
    for s in timed_saves(every, steps):
        a, c, d = begin[s - 1], begin[s - 1 + 2 * w], begin[s - 1 + 3 * w]
        out.append((c - a) - 2 * (d - c))
    return out
