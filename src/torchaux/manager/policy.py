"""Which steps to save and which committed steps to keep.

The rules of orbax's ``CheckpointManager`` (``save_interval_steps``,
``max_to_keep``, ``keep_period``, ``best_fn``/``best_mode``) and torchtitan's
``keep_latest_k`` (ecosystem-anchors.md §3), with one difference: retention
looks only at *committed* steps, and the newest committed step is always
kept, so ``keep_latest=1`` is safe (torchtitan rejects 1 because its purge
could delete the newest while a save was still in flight).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from torchaux.manager.steps import StepInfo

__all__ = ["SavePolicy", "RetentionPolicy", "BEST_MODES"]

BEST_MODES = ("min", "max")

BestFn = Callable[[Mapping[str, float]], float]


def _positive_or_none(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1 or None; got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 or None (keep all); got {value}")
    return value


@dataclass(frozen=True)
class SavePolicy:
    """Save every ``interval`` steps (step 0 included).

    >>> [s for s in range(7) if SavePolicy(3).should_save(s)]
    [0, 3, 6]
    """

    interval: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int):
            raise TypeError(
                f"save_interval_steps must be an int >= 1; got {type(self.interval).__name__}"
            )
        if self.interval < 1:
            raise ValueError(f"save_interval_steps must be >= 1; got {self.interval}")

    def should_save(self, step: int) -> bool:
        return step % self.interval == 0


class RetentionPolicy:
    """Keep the latest N, every K-th and the best N committed steps; delete the rest.

    Args:
        keep_latest: newest steps to keep (None: keep every step).
        keep_every_steps: also keep steps divisible by this (None: none).
        best_fn: scores a step from its metrics (a callable, or a metric
            name); steps saved without metrics are never "best".
        best_mode: ``"min"`` or ``"max"``: which score is best.
        keep_best: best steps to keep (needs ``best_fn``; None: none).

    Example:
        >>> p = RetentionPolicy(keep_latest=2, best_fn="loss", keep_best=1)
        >>> steps = [StepInfo(s, {"loss": l}) for s, l in [(1, 0.1), (2, 0.5), (3, 0.4), (4, 0.3)]]
        >>> p.to_delete(steps)
        [2]
    """

    def __init__(
        self,
        *,
        keep_latest: int | None = 3,
        keep_every_steps: int | None = None,
        best_fn: BestFn | str | None = None,
        best_mode: str = "min",
        keep_best: int | None = None,
    ) -> None:
        self.keep_latest = _positive_or_none(keep_latest, "keep_latest")
        self.keep_every_steps = _positive_or_none(keep_every_steps, "keep_every_steps")
        self.keep_best = _positive_or_none(keep_best, "keep_best")
        if best_fn is not None and not (callable(best_fn) or isinstance(best_fn, str)):
            raise TypeError(
                "best_fn must be a callable metrics -> number, a metric name or None; "
                f"got {type(best_fn).__name__}"
            )
        if not isinstance(best_mode, str) or best_mode not in BEST_MODES:
            raise ValueError(f"best_mode must be 'min' or 'max'; got {best_mode!r}")
        if self.keep_best is not None and best_fn is None:
            raise ValueError(
                f"keep_best={keep_best} needs best_fn (which metric makes a step best); "
                "pass best_fn='loss' or a callable"
            )
        self.best_fn = best_fn
        self.best_mode = best_mode

    def score(self, info: StepInfo) -> float | None:
        """The step's score, or None if it has no metrics to score."""
        if self.best_fn is None or not info.metrics:
            return None
        if isinstance(self.best_fn, str):
            value = info.metrics.get(self.best_fn)
            return None if value is None else float(value)
        return float(self.best_fn(info.metrics))

    def best(self, steps: Iterable[StepInfo], n: int = 1) -> list[int]:
        """The ``n`` best steps, best first (ties: the newer step wins)."""
        scored = [(s, info.step) for info in steps if (s := self.score(info)) is not None]
        sign = 1.0 if self.best_mode == "min" else -1.0
        scored.sort(key=lambda pair: (sign * pair[0], -pair[1]))
        return [step for _, step in scored[:n]]

    def to_delete(self, committed: Iterable[StepInfo]) -> list[int]:
        """Committed steps the policy no longer keeps, oldest first; never the newest."""
        steps = sorted(committed, key=lambda info: info.step)
        if not steps or self.keep_latest is None:
            return []
        keep = {info.step for info in steps[-self.keep_latest:]}
        keep.add(steps[-1].step)
        if self.keep_every_steps is not None:
            keep.update(i.step for i in steps if i.step % self.keep_every_steps == 0)
        if self.keep_best is not None:
            keep.update(self.best(steps, self.keep_best))
        return [info.step for info in steps if info.step not in keep]
