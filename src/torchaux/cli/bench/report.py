"""Presentation of `torchaux bench` results: text table, JSON and a PNG plot."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["format_table", "write_json", "write_plot"]

_COLUMNS = [
    ("method", "method", "{}"),
    ("stall 1st", "stall_first_s", "{:.3f}s"),
    ("stall", "stall_steady_s", "{:.3f}s"),
    ("x torch.save", "stall_vs_torch_save", "{:.3f}"),
    ("loop +/save", "loop_overhead_per_save_s", "{:+.3f}s"),
    ("x torch.save", "loop_overhead_vs_torch_save", "{:.2f}"),
    ("bg CPU/GiB", "background_cpu_s_per_gib", "{:.3f}s"),
    ("durable", "durable_steady_s", "{:.3f}s"),
    ("x save+fsync", "durable_vs_torch_save_fsync", "{:.2f}"),
    ("peak +RSS", "peak_extra_rss_mib", "{:.0f}MiB"),
    ("consistent", "consistent_files", "{}"),
    ("exact@call", "exact_at_call", "{}"),
]


def format_table(results: dict[str, Any]) -> str:
    """Render results as a fixed-width table, one row per method."""
    rows = [[title for title, _, _ in _COLUMNS]]
    for r in results["methods"]:
        row = []
        for _, key, fmt in _COLUMNS:
            value = r.get(key)
            if key == "exact_at_call":
                row.append("yes" if value else "NO (torn)")
            elif key == "consistent_files":
                row.append(f"{value}/{r['saves']}" + ("" if r["all_consistent"] else " TORN"))
            else:
                row.append("-" if value is None else fmt.format(value))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    cfg = results["config"]
    head = (
        f"state {results['state_mib']:.0f} MiB on {results['device']}, {cfg['steps']} steps, "
        f"a save every {cfg['every']} steps, baseline loop {results['baseline_loop_s']:.2f}s "
        f"(torch {results['torch_version']}, {results['cpu_count']} CPUs)"
        + ("; torchaux pools prepared (saver.prepare) before the loop" if cfg.get("prepare") else "")
    )
    notes = (
        "stall: training thread blocked per save (steady state = median after the first);\n"
        "loop +/save: extra loop wall time per save vs no-save loops run just before and after\n"
        "  in the same process (includes CPU contention);\n"
        "bg CPU/GiB: CPU seconds of torchaux's background threads per GiB saved (writer,\n"
        "  direct I/O, cipher pool; a process saver's child is not counted);\n"
        "durable: call -> bytes fsynced; consistent: files equal to the state at their step;\n"
        "exact@call: a save followed at once by optimizer.step() holds the pre-step state;\n"
        "peak +RSS: growth over the RSS after the first step, minus the no-save loop's growth."
    )
    parts = [head, "", *lines, "", notes]
    secure = [r for r in results["methods"] if "stall_vs_plain_async" in r]
    if secure:
        parts += ["", "secure saves vs torchaux.save_async (same run):"]
        for r in secure:
            parts.append(
                f"  {r['method']:<32} stall x{r['stall_vs_plain_async']:.2f}  "
                f"loop overhead x{r['loop_overhead_vs_plain_async']:.2f}  "
                f"durable speed x{r['durable_speed_vs_plain_async']:.2f}"
            )
    if results.get("writer_probe"):
        parts += ["", "writer only (no training), save_checkpoint + CRC, medians of 3:",
                  "  mode     until durable  throughput  durable speed  cores busy (no fsync)"]
        plain_s = next(p["seconds"] for p in results["writer_probe"] if p["mode"] == "plain")
        for p in results["writer_probe"]:
            parts.append(
                f"  {p['mode']:<8} {p['seconds']:12.2f}s  {p['gb_per_s']:6.2f} GB/s  "
                f"{'x' + format(plain_s / p['seconds'], '.2f'):>13}  {p['cpu_per_wall']:10.2f}"
            )
    return "\n".join(parts)


def write_json(results: dict[str, Any], path: str) -> None:
    """Write results as pretty JSON."""
    with open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")


def write_plot(results: dict[str, Any], path: str) -> None:
    """Bar chart of stall and time-to-durable per method (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "--plot needs matplotlib: pip install 'torchaux[plot]' (or pip install matplotlib)"
        ) from None
    methods = [r["method"] for r in results["methods"]]
    stall = [r["stall_steady_s"] for r in results["methods"]]
    durable = [r["durable_steady_s"] for r in results["methods"]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], stall, width=0.4, label="training stall per save")
    ax.bar([x + 0.2 for x in xs], durable, width=0.4, label="time until durable")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(methods, rotation=15, ha="right")
    ax.set_ylabel("seconds")
    ax.set_title(f"checkpointing a {results['state_mib']:.0f} MiB state on {results['device']}")
    for x, r in zip(xs, results["methods"]):
        if not r["all_consistent"]:
            ax.annotate("TORN", (x, max(stall[x], durable[x])), ha="center", color="red")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
