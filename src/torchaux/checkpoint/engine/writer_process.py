"""The writer process of a :class:`~torchaux.checkpoint.engine.process_saver.ProcessSaver`.

Started as ``python -m torchaux.checkpoint.engine.writer_process <fd>`` - never
through ``multiprocessing``'s ``spawn``, which re-imports the user's ``__main__``
in the child (a training script without an ``if __name__ == "__main__":``
guard would run its training code again in the writer).  It talks to the
parent over the socket ``fd`` with :class:`multiprocessing.connection.Connection`:
first the parent's ``sys.path`` (so write specs naming user modules unpickle),
then one :class:`Job` at a time, each answered with ``("ok", result)`` or
``("error", exception)``.  It ignores SIGINT (Ctrl-C in the terminal reaches
the whole process group; the parent decides) and ends on ``None`` or when the
parent goes away (EOF).
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from torchaux.checkpoint.engine.staging import Snapshot, TensorLocation
from torchaux.checkpoint.engine.staging.copies import Record

__all__ = ["Job", "main"]

_SHM_DIR = "/dev/shm"


@dataclass
class Job:
    """One write, as sent to the child: segment names instead of bytes."""

    write: Callable[[Snapshot], Any]
    pickled: bytes
    records: list[tuple[str, str | None, int]]  # key, segment name (None: empty), nbytes
    tensor_index: dict[str, TensorLocation]


def _open(job: Job) -> tuple[Snapshot, list[mmap.mmap]]:
    maps, records = [], []
    for key, name, nbytes in job.records:
        if name is None:
            storage = torch.UntypedStorage(0)
        else:
            fd = os.open(os.path.join(_SHM_DIR, name.lstrip("/")), os.O_RDWR)
            try:
                mm = mmap.mmap(fd, max(nbytes, 1))
            finally:
                os.close(fd)
            maps.append(mm)
            storage = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes).untyped_storage()
        records.append(Record(key, None, storage, False))
    snap = Snapshot(job.pickled, records, tensor_index=job.tensor_index)
    snap._buffers_ready.set()
    snap._all_ready.set()
    return snap, maps


def _serve(conn: Connection) -> None:
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return  # the parent is gone
        except Exception as exc:  # noqa: BLE001 - e.g. a write spec naming __main__: reported
            _answer_error(conn, exc)
            continue
        if job is None:
            return
        try:
            snap, maps = _open(job)
            try:
                answer = ("ok", job.write(snap))
            finally:
                snap._records = []
                del snap
                for mm in maps:
                    mm.close()
            conn.send(answer)
        except BaseException as exc:  # noqa: BLE001 - sent back to the parent, re-raised there
            _answer_error(conn, exc)


def _answer_error(conn: Connection, exc: BaseException) -> None:
    try:
        conn.send(("error", exc))
    except Exception:  # noqa: BLE001 - the exception itself would not pickle: send its text
        conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))


def main(fd: int) -> None:
    """Serve jobs on the connection ``fd`` until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    parent_path = conn.recv()
    sys.path[:] = [*parent_path, *(p for p in sys.path if p not in parent_path)]
    _serve(conn)


if __name__ == "__main__":
    # Run through the package's module object, not this __main__ copy, so the
    # parent's pickled Job resolves to the same class.
    from torchaux.checkpoint.engine import writer_process

    writer_process.main(int(sys.argv[1]))
