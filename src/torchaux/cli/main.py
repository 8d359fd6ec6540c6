"""The ``torchaux`` command line."""

from __future__ import annotations

import argparse
import pickle
import sys
import zipfile
from collections.abc import Sequence
from typing import Any, NoReturn

from torchaux.cli.bench.methods import METHODS
from torchaux.cli.bench.secure import SECURE_METHODS
from torchaux.errors import CheckpointError

__all__ = ["main", "build_parser"]

# Library errors that the checkpoint commands report as one line with exit
# status 1 (the file is damaged, the key is wrong, the arguments do not fit
# the file); anything else is a bug and keeps its traceback.
_FAILURES = (
    CheckpointError, ValueError, TypeError, OSError, EOFError, RuntimeError,
    zipfile.BadZipFile, pickle.UnpicklingError,
)
_KEY_HINT = (
    "; keys are never accepted on the command line: use --dec-key-file/--enc-key-file PATH or "
    "the TORCHAUX_DEC_KEY/TORCHAUX_ENC_KEY environment variables"
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that never echoes the values of unrecognized arguments.

    A mistyped option may carry a secret (``--dec-key 00ff...``); argparse would
    print it back in its error message.
    """

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            shown = []
            for arg in extras:
                name = arg.split("=", 1)[0] + ("=..." if "=" in arg else "")
                shown.append(name if arg.startswith("-") else "...")
            hint = _KEY_HINT if any("key" in a.lower() for a in shown) else ""
            self.error(f"unrecognized arguments: {' '.join(shown)} (values not shown){hint}")
        return ns

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        # argparse echoes bad values ("invalid choice: '00ff...'"); hide key-like ones.
        from torchaux.cli.keys import redact

        super().error(redact(message))


def _first_line(exc: BaseException) -> str:
    from torchaux.cli.keys import redact  # a key typed as FILE must not be echoed back

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return redact(lines[0]) if lines else type(exc).__name__


def _run_checked(args: argparse.Namespace) -> int:
    from torchaux.cli.keys import KeySourceError

    try:
        return int(args.func(args))
    except (KeySourceError, ImportError) as exc:
        print(f"torchaux {args.command}: error: {_first_line(exc)}", file=sys.stderr)
        return 2
    except _FAILURES as exc:
        print(f"torchaux {args.command}: error: {_first_line(exc)}", file=sys.stderr)
        return 1


def _inspect(args: argparse.Namespace) -> int:
    from torchaux.cli.inspect import run_inspect

    return run_inspect(args)


def _verify(args: argparse.Namespace) -> int:
    from torchaux.cli.verify import run_verify

    return run_verify(args)


def _convert(args: argparse.Namespace) -> int:
    from torchaux.cli.convert import run_convert

    return run_convert(args)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dec-key-file", metavar="PATH",
        help="decryption key: 16/24/32 raw bytes, or 32/48/64 hex digits (+ newline); the file "
        "must be private (chmod 600). Default: $TORCHAUX_DEC_KEY (hex). The mode is read "
        "from the file",
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="progress bar on stderr (default: only on a terminal, for files >= 64 MiB)",
    )


def _add_checkpoint_commands(sub: Any) -> None:
    from torchaux.checkpoint.save import ENC_MODES, FORMATS

    inspect = sub.add_parser(
        "inspect", allow_abbrev=False,
        help="show a checkpoint's format, encryption, CRC and entries",
        description="Show a checkpoint's format, encryption, CRC and a table of entries "
        "(name, dtype, shape, bytes). An encrypted file shows only its envelope unless its "
        "key is given. A directory is a distributed (DCP) checkpoint: ranks, data files, "
        "tensors with global shapes and shard layout, checksums and encryption, read from its "
        "metadata (no key needed).",
    )
    inspect.add_argument("file", metavar="PATH",
                         help="a checkpoint file, or a distributed checkpoint directory")
    _common(inspect)
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=_inspect, checked=True)

    verify = sub.add_parser(
        "verify", allow_abbrev=False,
        help="exit 0 only if a checkpoint is complete and intact",
        description="Decrypt and authenticate every chunk (encrypted files), check every CRC "
        "the file records and parse it. Exit status: 0 intact, 1 not (reason on stderr), 2 "
        "usage error (including an encrypted file without a key). A directory is a distributed "
        "checkpoint: its metadata, every data file and every chunk's checksum are checked; "
        "encrypted chunks are decrypted only with a key (without one, the summary says so).",
    )
    verify.add_argument("file", metavar="PATH",
                        help="a checkpoint file, or a distributed checkpoint directory")
    _common(verify)
    verify.add_argument("--require-crc", action="store_true",
                        help="also fail if the file (or directory) records no CRC/checksums")
    verify.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    verify.set_defaults(func=_verify, checked=True)

    convert = sub.add_parser(
        "convert", allow_abbrev=False,
        help="rewrite a checkpoint as ckpt or safetensors, re-encrypting as asked",
        description="Load SRC (decrypting and checking it) and write DST atomically in "
        "--format, encrypted if an encryption key is given, with a CRC unless --no-crc.",
    )
    convert.add_argument("src", metavar="SRC")
    convert.add_argument("dst", metavar="DST")
    convert.add_argument("--format", required=True, choices=FORMATS, help="format of DST")
    _common(convert)
    convert.add_argument(
        "--enc-key-file", metavar="PATH",
        help="encrypt DST with this key (same file rules as --dec-key-file). "
        "Default: $TORCHAUX_ENC_KEY (hex); neither: DST is not encrypted",
    )
    convert.add_argument("--enc-mode", choices=ENC_MODES,
                         help="encryption mode of DST (default AES-GCM; needs a key)")
    convert.add_argument("--no-crc", action="store_true", help="write DST without a CRC")
    convert.add_argument("--force", action="store_true", help="replace an existing DST")
    convert.set_defaults(func=_convert, checked=True)


def _bench(args: argparse.Namespace) -> int:
    if args.manager:
        return _bench_manager(args)
    if args.load or args.distributed or args.cuda:
        import importlib

        suite = importlib.import_module(
            "torchaux.cli.bench.suites."
            + ("load" if args.load else "distributed" if args.distributed else "cuda")
        )
        return int(suite.main(args))
    from torchaux.cli.bench.run import BenchConfig, run_bench
    from torchaux.cli.bench.report import format_table, write_json, write_plot

    from torchaux.cli.bench.secure import SECURE_DEFAULT_METHODS

    if args.frameworks:
        from torchaux.cli.bench.suites.frameworks import format_frameworks, run_frameworks

        print(format_frameworks(run_frameworks(
            size_mib=args.size_mib, steps=args.steps, every=args.every,
            directory=args.dir,
            log=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True) if args.verbose else None,
        )))
        return 0
    # --secure: a 1 GiB state (issue #3's bar) with a lighter step, fewer saves.
    profile = _SECURE_PROFILE if args.secure else _PLAIN_PROFILE
    cfg = BenchConfig(
        size_mib=args.size_mib or profile["size_mib"],
        steps=args.steps or profile["steps"],
        every=args.every or profile["every"],
        batch=args.batch or profile["batch"],
        directory=args.dir,
        device=args.device,
        methods=tuple(args.method) if args.method
        else (SECURE_DEFAULT_METHODS if args.secure else tuple(METHODS)),
        seed=args.seed,
        writer_probe=args.secure,
        prepare=args.prepare,
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
    ours = [r for r in results["methods"]
            if r["method"] not in ("torch.save (thread)", "dcp.async_save")]
    return 0 if all(r["all_consistent"] and r["exact_at_call"] for r in ours) else 1


def _bench_manager(args: argparse.Namespace) -> int:
    import json

    from torchaux.cli.bench.suites.manager import format_manager_report, run_manager_bench

    log = (lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)) if args.verbose else (
        lambda _m: None
    )
    results = run_manager_bench(size_mib=args.size_mib or 256, directory=args.dir, log=log)
    print(format_manager_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


_PLAIN_PROFILE = {"size_mib": 256, "steps": 30, "every": 5, "batch": 128}
_SECURE_PROFILE = {"size_mib": 1024, "steps": 24, "every": 4, "batch": 16}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = _Parser(prog="torchaux", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="checkpoint a small training run with torch.save, DCP and torchaux, side by side",
    )
    bench.add_argument("--secure", action="store_true",
                       help="compare encrypted+CRC save_checkpoint modes with save_async "
                            "(1 GiB state) and probe cipher throughput")
    bench.add_argument("--manager", action="store_true",
                       help="CheckpointManager save stall vs bare save_async, and S3 upload vs "
                            "s3fs put_file on a local moto server (needs moto[server], s3fs)")
    bench.add_argument("--frameworks", action="store_true",
                       help="Lightning and Hugging Face Trainer runs: their own checkpointing "
                       "against torchaux's drop-ins (needs torchaux[lightning,hf])")
    bench.add_argument("--load", action="store_true",
                       help="load throughput and peak RSS of every format torchaux writes against "
                            "torch.load and safetensors, page cache cold and warm")
    bench.add_argument("--distributed", action="store_true",
                       help="sharded saves on real gloo ranks (FSDP2): torchaux.distributed "
                            "against dcp.save / dcp.async_save, stall, overhead, load, RSS")
    bench.add_argument("--cuda", action="store_true",
                       help="GPU figures: D2H staging against the pinned memcpy limit, loads "
                            "with map_location='cuda', the model= stall (needs a CUDA device; "
                            "--size-mib default 4096)")
    bench.add_argument("--nproc", type=int, default=None,
                       help="ranks for --distributed (default 2)")
    bench.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                       help="--distributed: start the ranks with glibc's MALLOC_MMAP_THRESHOLD_ "
                            "fixed, so peak RSS shows the checkpointer's own memory, not the "
                            "heap's fragmentation (default: glibc's dynamic threshold)")
    bench.add_argument("--size-mib", type=int, default=None,
                       help="training state size in MiB (default 256; --secure: 1024)")
    bench.add_argument("--steps", type=int, default=None,
                       help="training steps per method (default 30; --secure: 24)")
    bench.add_argument("--every", type=int, default=None,
                       help="save every N steps, so the disk keeps up (default 5; --secure: 4)")
    bench.add_argument("--batch", type=int, default=None,
                       help="batch size, i.e. compute per step (default 128; --secure: 16)")
    bench.add_argument("--dir", default=None, help="directory for checkpoints (default: temp)")
    bench.add_argument("--device", default="auto", help="auto (cuda if available; --distributed: cpu), cpu, cuda "
                       "(--distributed: NCCL, one rank per GPU)")
    bench.add_argument("--method", action="append", choices=[*METHODS, *SECURE_METHODS],
                       help="run only this method (repeatable)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--prepare", action="store_true",
                       help="torchaux methods call saver.prepare(state) before the timed loop "
                            "(the README's advice for a cheap first save)")
    bench.add_argument("--json", help="also write results as JSON to this path")
    bench.add_argument("--plot", help="also write a PNG bar chart to this path")
    bench.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    bench.set_defaults(func=_bench)
    _add_checkpoint_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``torchaux`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "checked", False):
        return _run_checked(args)
    try:
        return int(args.func(args))
    except (ValueError, ImportError) as exc:
        print(f"torchaux: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
