"""An immutable snapshot of where the counted FLOPs went: per operator and per module.

Why a separate, frozen object: the counter keeps mutating while a step runs
(possibly from autograd threads), so callers get a copy taken under the
counter's lock that they can inspect, compare or render without racing it.
The plain-text :meth:`FlopsBreakdown.table` exists because
``FlopCounterMode.get_table`` needs the third-party ``tabulate`` package
(torch 2.13 imports it lazily and raises ``ModuleNotFoundError`` without it).

Module names are those of ``torch.utils.module_tracker.ModuleTracker``, the
tracker ``FlopCounterMode`` uses: class-name based paths such as
``"Sequential.0"``, plus ``"Global"`` for everything.  A module's FLOPs include
its children's, and its backward FLOPs are attributed to it as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["OpFlops", "FlopsBreakdown", "Tally", "format_flops"]

# Decimal prefixes, as FLOP counts are usually quoted (1 GFLOP = 1e9 FLOPs).
_PREFIXES = ("", "K", "M", "G", "T", "P", "E")


def format_flops(flops: int) -> str:
    """Render a FLOP count with a decimal prefix and three significant digits.

    Example:
        >>> format_flops(86400)
        '86.4K'
        >>> format_flops(512)
        '512'
    """
    value = float(flops)
    index = 0
    while abs(value) >= 1000 and index < len(_PREFIXES) - 1:
        value /= 1000
        index += 1
    if index == 0:
        return str(flops)
    return f"{value:.3g}{_PREFIXES[index]}"


class OpFlops(NamedTuple):
    """FLOPs of one entry: ``model`` (outside pause/recompute) and ``total`` (all)."""

    model: int
    total: int


@dataclasses.dataclass(frozen=True)
class FlopsBreakdown:
    """Where the FLOPs of a counting session went.

    Attributes:
        model_flops: FLOPs counted outside ``pause()``/recomputation (for MFU).
        total_flops: every counted FLOP, recomputation included (for HFU).
        by_op: operator name (e.g. ``"aten.mm"``) -> FLOPs.
        by_module: module path -> operator name -> FLOPs; empty when the
            session ran with ``by_module=False``.
        uncounted: operators that ran but were not counted: matmul-class
            kernels without a formula (``coverage.py``), formulas that could
            not tell (an unknown layout) and higher-order operators without a
            formula (their inner matmuls are not counted either).  Each is also
            warned about once per process; empty when everything was counted.

    Example:
        >>> b = FlopsBreakdown(72, 144, {"aten.mm": OpFlops(72, 144)}, {}, ())
        >>> print(b.table())
        module / op  model  total  % total
        Global          72    144   100.0%
         - aten.mm      72    144   100.0%
    """

    model_flops: int
    total_flops: int
    by_op: Mapping[str, OpFlops]
    by_module: Mapping[str, Mapping[str, OpFlops]]
    uncounted: tuple[str, ...]

    def module_flops(self) -> dict[str, OpFlops]:
        """Per-module sums over operators (children included in their parents).

        Example:
            >>> b = FlopsBreakdown(8, 8, {}, {"Global": {"aten.mm": OpFlops(8, 8)}}, ())
            >>> b.module_flops()
            {'Global': OpFlops(model=8, total=8)}
        """
        return {
            name: OpFlops(sum(f.model for f in ops.values()), sum(f.total for f in ops.values()))
            for name, ops in self.by_module.items()
        }

    def table(self, *, depth: int = 2) -> str:
        """A plain-text table of modules down to ``depth`` levels, each with its operators.

        Args:
            depth: deepest module level shown (``"Sequential.0"`` is level 2);
                0 shows only the ``Global`` rows.

        Returns:
            The table as one string without a trailing newline.
        """
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}; pass 0 for the Global rows only")
        sections: list[tuple[str, int, Mapping[str, OpFlops]]] = [("Global", 0, self.by_op)]
        for name in sorted(self.by_module):
            level = name.count(".") + 1
            if name != "Global" and level <= depth:
                sections.append((name, level, self.by_module[name]))
        rows = [("module / op", "model", "total", "% total")]
        for name, level, ops in sections:
            pad = " " * level
            model = sum(f.model for f in ops.values())
            total = sum(f.total for f in ops.values())
            rows.append((pad + name, format_flops(model), format_flops(total), self._pct(total)))
            for op in sorted(ops, key=lambda key: -ops[key].total):
                counts = ops[op]
                rows.append(
                    (
                        f"{pad} - {op}",
                        format_flops(counts.model),
                        format_flops(counts.total),
                        self._pct(counts.total),
                    )
                )
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = []
        for row in rows:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
            lines.append("  ".join(cells))
        return "\n".join(lines)

    def _pct(self, flops: int) -> str:
        return f"{100 * flops / self.total_flops:.1f}%" if self.total_flops else "0.0%"


class Tally:
    """The counter's mutable totals, from which snapshots are taken; callers hold its lock."""

    def __init__(self) -> None:
        self.model = 0
        self.total = 0
        self.by_op: dict[str, list[int]] = {}
        self.by_module: dict[str, dict[str, list[int]]] = {}
        self.uncounted: set[str] = set()

    def add(self, op: str, flops: int, *, model: bool, modules: tuple[str, ...]) -> None:
        model_flops = flops if model else 0
        self.model += model_flops
        self.total += flops
        for table in (self.by_op, *(self.by_module.setdefault(m, {}) for m in modules)):
            entry = table.setdefault(op, [0, 0])
            entry[0] += model_flops
            entry[1] += flops
