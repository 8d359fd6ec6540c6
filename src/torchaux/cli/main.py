"""The ``torchaux`` command line."""

from __future__ import annotations

import argparse
import sys

from torchaux.cli.bench_methods import METHODS

__all__ = ["main"]


def _bench(args: argparse.Namespace) -> int:
    from torchaux.cli.bench import BenchConfig, run_bench
    from torchaux.cli.bench_report import format_table, write_json, write_plot

    cfg = BenchConfig(
        size_mib=args.size_mib,
        steps=args.steps,
        every=args.every,
        batch=args.batch,
        directory=args.dir,
        device=args.device,
        methods=tuple(args.method) if args.method else tuple(METHODS),
        seed=args.seed,
    )
    log = (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)) if args.verbose else (
        lambda _m: None
    )
    results = run_bench(cfg, log)
    print(format_table(results))
    if args.json:
        write_json(results, args.json)
    if args.plot:
        write_plot(results, args.plot)
    # Exit 1 if torchaux (or the torch.save control) wrote a file that does not
    # match its step; other methods' tearing is what the table reports.
    ours = [r for r in results["methods"] if r["method"].startswith(("torchaux", "torch.save"))
            and r["method"] != "torch.save (thread)"]
    return 0 if all(r["all_consistent"] and r["exact_at_call"] for r in ours) else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="torchaux", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="checkpoint a small training run with torch.save, DCP and torchaux, side by side",
    )
    bench.add_argument("--size-mib", type=int, default=256, help="training state size (MiB)")
    bench.add_argument("--steps", type=int, default=24, help="training steps per method")
    bench.add_argument("--every", type=int, default=6, help="save every N steps")
    bench.add_argument("--batch", type=int, default=32, help="batch size")
    bench.add_argument("--dir", default=None, help="directory for checkpoints (default: temp)")
    bench.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    bench.add_argument("--method", action="append", choices=list(METHODS),
                       help="run only this method (repeatable)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", help="also write results as JSON to this path")
    bench.add_argument("--plot", help="also write a PNG bar chart to this path")
    bench.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``torchaux`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, ImportError) as exc:
        print(f"torchaux: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
