"""The checkpointing methods `torchaux bench` compares, behind one small interface.

Each method is asked to save the training state at a step, and later to wait
for everything it started and to load back what it wrote.  Stall is what the
training thread spends inside :meth:`Method.save` (plus, for the ``model=``
mode, time blocked in fences, which the runner measures separately).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from torchaux.checkpoint.api import save_async
from torchaux.checkpoint.engine.saver import AsyncSaver

__all__ = ["Method", "METHODS"]


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Method:
    """One way of checkpointing; subclasses fill in save/finish/load."""

    name = ""
    uses_model_hook = False

    def __init__(self, directory: str) -> None:
        self.directory = directory
        # step -> seconds from the save call until the data was durable
        self.durable_s: dict[int, float] = {}
        self.paths: dict[int, str] = {}

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step{step:05d}.pt".replace("-", "m"))

    def save(self, step: int, state: dict[str, Any], model: torch.nn.Module) -> None:
        raise NotImplementedError

    def prepare(self, state: dict[str, Any]) -> None:
        """Warm up for saves of states shaped like ``state`` (``--prepare``); most methods: nothing."""

    def after_save(self) -> None:
        """Work the runner does after the stall timer stops (torch.save's fsync)."""

    def finish(self) -> None:
        """Wait for every save this method started (not timed as stall)."""

    def load(self, step: int, template: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Read back the file of ``step`` (``template`` builds an empty state)."""
        return dict(torch.load(self.paths[step], weights_only=True, map_location="cpu"))

    def close(self) -> None:
        """Release what the method holds (pools, threads)."""


class TorchSave(Method):
    name = "torch.save"

    def save(self, step: int, state: dict[str, Any], model: torch.nn.Module) -> None:
        start = time.perf_counter()
        path = self.path(step)
        torch.save(state, path)
        self.paths[step] = path
        # Durability costs an fsync on top; counted in time-to-durable, and
        # measured outside the stall figure so torch.save's stall is its own.
        self._pending_fsync = (step, start, path)

    def after_save(self) -> None:
        step, start, path = self._pending_fsync
        _fsync_path(path)
        self.durable_s[step] = time.perf_counter() - start


class TorchSaveThread(Method):
    name = "torch.save (thread)"

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def save(self, step: int, state: dict[str, Any], model: torch.nn.Module) -> None:
        path = self.path(step)
        start = time.perf_counter()

        def run() -> None:
            try:
                torch.save(state, path)  # reads live tensors while training goes on
                _fsync_path(path)
                self.durable_s[step] = time.perf_counter() - start
            except BaseException as exc:  # noqa: BLE001 - re-raised in finish()
                self.errors.append(exc)

        thread = threading.Thread(target=run, name=f"bench-save-{step}")
        thread.start()
        self.threads.append(thread)
        self.paths[step] = path

    def finish(self) -> None:
        for thread in self.threads:
            thread.join()
        if self.errors:
            raise self.errors[0]


class DcpAsyncSave(Method):
    name = "dcp.async_save"

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.future: Future[Any] | None = None
        self.futures: list[Future[Any]] = []

    def save(self, step: int, state: dict[str, Any], model: torch.nn.Module) -> None:
        import warnings

        import torch.distributed.checkpoint as dcp

        if self.future is not None:
            # DCP's documented pattern: wait for the previous save before the next.
            self.future.result()
        start = time.perf_counter()
        path = os.path.join(self.directory, f"step{step:05d}.dcp".replace("-", "m"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming single process" notice
            future = dcp.async_save(state, checkpoint_id=path)
        future.add_done_callback(
            lambda _f, s=step, t=start: self.durable_s.__setitem__(s, time.perf_counter() - t)
        )
        self.future = future
        self.futures.append(future)
        self.paths[step] = path

    def finish(self) -> None:
        for future in self.futures:
            future.result()

    def load(self, step: int, template: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        import warnings

        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = template()
            dcp.load(state, checkpoint_id=self.paths[step])
        return state


class TorchauxSaveAsync(Method):
    name = "torchaux.save_async"

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.saver = AsyncSaver(name="bench-writer")
        self.handles: list[Any] = []

    def prepare(self, state: dict[str, Any]) -> None:
        """``saver.prepare``: the pool's buffers allocated and faulted in before training."""
        self.saver.prepare(state)

    def _record(self, step: int, handle: Any, start: float) -> None:
        handle.committed.add_done_callback(
            lambda _f: self.durable_s.__setitem__(step, time.perf_counter() - start)
        )
        self.handles.append(handle)

    def save(self, step: int, state: dict[str, Any], model: torch.nn.Module) -> None:
        start = time.perf_counter()
        path = self.path(step)
        handle = save_async(state, path, saver=self.saver)
        self._record(step, handle, start)
        self.paths[step] = path

    def finish(self) -> None:
        for handle in self.handles:
            handle.wait()

    def close(self) -> None:
        self.saver.close()


class TorchauxSaveAsyncModel(TorchauxSaveAsync):
    name = "torchaux.save_async(model=)"
    uses_model_hook = True

    def save(self, step: int, state: dict[str, Any], model: torch.nn.Module) -> None:
        start = time.perf_counter()
        path = self.path(step)
        handle = save_async(state, path, model=model, saver=self.saver)
        self._record(step, handle, start)
        self.paths[step] = path


METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (TorchSave, TorchSaveThread, DcpAsyncSave, TorchauxSaveAsync, TorchauxSaveAsyncModel)
}
