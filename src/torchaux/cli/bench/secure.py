"""`torchaux bench --secure`: encrypted + CRC checkpoints against the plain async save.

Training-loop figures come from the same harness as the plain bench (one
fresh process per method); the state is flattened to ``name -> value`` as
``save_checkpoint`` expects.  A writer-only probe then saves the state once
per mode with no training running and reports throughput and how many cores
the cipher kept busy (process CPU seconds per wall second: 2.0 = both cores).
The probe's saves are durable, so its plain/AES-GCM time ratio is issue #3's
"time-to-durable" bar measured without training competing for the cores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from torchaux import _knobs
from torchaux.checkpoint.engine.saver import AsyncSaver
from torchaux.checkpoint.load import load_checkpoint
from torchaux.checkpoint.save import save_checkpoint
from torchaux.cli.bench.methods import TorchauxSaveAsync

__all__ = ["BENCH_KEY", "SECURE_DEFAULT_METHODS", "SECURE_METHODS", "flatten", "writer_probe"]

#: A fixed demo key: the bench measures cost, it protects nothing.
BENCH_KEY = bytes(range(32))
_MODES = {"AES-GCM": 32, "AES-CBC": 32, "SM4-CBC": 16}


def flatten(state: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists of tensors and scalars -> ``"a.b.0" -> value`` (None dropped).

    >>> flatten({"m": {"w": 1}, "l": [2.0, None]})
    {'m.w': 1, 'l.0': 2.0}
    """
    out: dict[str, Any] = {}
    if isinstance(state, dict):
        items = [(str(k), v) for k, v in state.items()]
    elif isinstance(state, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(state)]
    else:
        return {prefix: state} if state is not None else {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


class _SecureSave(TorchauxSaveAsync):
    """save_checkpoint(async_save="thread", crc_check=True) with one cipher mode."""

    enc_mode: str | None = None

    def save(self, step: int, state: dict[str, Any], model: torch.nn.Module) -> None:
        start = time.perf_counter()
        path = self.path(step)
        key = BENCH_KEY[: _MODES[self.enc_mode]] if self.enc_mode else None
        handle = save_checkpoint(
            flatten(state), path, async_save="thread", crc_check=True,
            enc_key=key, enc_mode=self.enc_mode or "AES-GCM", saver=self.saver,
        )
        self._record(step, handle, start)
        self.paths[step] = path

    def load(self, step: int, template: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        key = BENCH_KEY[: _MODES[self.enc_mode]] if self.enc_mode else None
        return load_checkpoint(self.paths[step], dec_key=key,
                               dec_mode=self.enc_mode or "AES-GCM", crc_check=True)


def _secure(mode: str | None) -> type[_SecureSave]:
    label = f"save_checkpoint {mode or 'plain'}+CRC"
    return type(label, (_SecureSave,), {"name": label, "enc_mode": mode})


SECURE_METHODS: dict[str, type[TorchauxSaveAsync]] = {
    cls.name: cls for cls in (_secure(None), *(_secure(m) for m in _MODES))
}
#: What ``--secure`` runs: the plain async save as the baseline, then each mode.
SECURE_DEFAULT_METHODS = ("torchaux.save_async", *SECURE_METHODS)


def writer_probe(size_mib: int, directory: str, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Save a ``size_mib`` state per mode, nothing else running; time the writer.

    Per mode: one save to warm the staging pool, three with fsync off for
    "cores busy" (process CPU seconds per wall second; waiting for the disk
    would dilute it), and three durable ones for the time until durable;
    medians are reported.  Every save goes to a new path, as step-numbered
    checkpoints do (replacing one file repeatedly would also time the file
    system freeing the previous copy's blocks), and the files of a mode are
    deleted, and ``os.sync()`` run, before the next mode starts.
    """
    n = size_mib * (1 << 20) // 4 // 8
    state = {f"w{i}": torch.randn(n) for i in range(8)}
    rows = []
    for mode in (None, *_MODES):
        log(f"writer probe: {mode or 'plain'}")
        saver = AsyncSaver(name="probe-writer")
        key = BENCH_KEY[: _MODES[mode]] if mode else None
        paths = [os.path.join(directory, f"probe-{mode or 'plain'}-{i}.ckpt") for i in range(7)]
        runs: list[tuple[float, float]] = []
        try:
            for i, path in enumerate(paths):
                with _knobs.override(fsync=int(i == 0 or i > 3)):
                    wall0, cpu0 = time.perf_counter(), time.process_time()
                    save_checkpoint(state, path, crc_check=True, enc_key=key,
                                    enc_mode=mode or "AES-GCM", saver=saver)
                    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                runs.append((wall, cpu / wall))
        finally:
            saver.close()
            for path in paths:
                if os.path.exists(path):
                    os.unlink(path)
            os.sync()
        fast_s, cores = sorted(runs[1:4])[1]  # medians: fsync off ...
        durable_s = sorted(w for w, _ in runs[4:])[1]  # ... and on
        rows.append({
            "mode": mode or "plain",
            "seconds": durable_s,
            "gb_per_s": size_mib * (1 << 20) / durable_s / 1e9,
            "no_fsync_seconds": fast_s,
            "cpu_per_wall": cores,
        })
    return rows
