"""Training-side fences for ``save_async(..., model=model)``.

With ``model=`` the save returns before its CPU copies are done, so the next
forward overlaps staging.  Three global hooks then keep the snapshot
consistent, each blocking only while staging is unfinished:

* before ``model``'s forward: wait for the copies of its buffers (forward
  mutates BatchNorm statistics and similar);
* before ``model``'s backward (a gradient hook on every forward output that
  requires grad): wait for every copy - covers hand-written updates too;
* before any ``torch.optim`` optimizer step: wait for every copy.

On accelerators each wait is a stream wait (``wait_event``), not a host sync.

The hooks are process-global (``register_module_forward_pre_hook`` and
friends) rather than attached to the module, so the model never carries an
unpicklable torchaux hook (torch_npu's module hook forced it to strip the
user's own hooks while pickling, spec §1 step 7).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._pytree import tree_leaves

from torchaux.checkpoint.engine.staging import Snapshot

__all__ = ["arm", "disarm", "armed_count"]

# id(model) -> (weak reference to the model, snapshot still staging)
_armed: dict[int, tuple[weakref.ReferenceType[torch.nn.Module], Snapshot]] = {}
_lock = threading.Lock()
_installed = False


def _lookup(module: torch.nn.Module) -> Snapshot | None:
    # torch.compile(model) returns a wrapper whose own (eager) call runs these
    # hooks; it names the armed model as `_orig_mod`.
    target = getattr(module, "_orig_mod", module)
    entry = _armed.get(id(target))
    if entry is None or entry[0]() is not target:
        return None
    return entry[1]


def _forward_pre(module: torch.nn.Module, args: Any) -> None:
    # Inside a graph that torch.compile traces, do nothing - and touch no
    # global state, or Dynamo would guard on `_armed` and recompile (or race
    # with the writer thread) whenever a save is armed or disarmed.  The
    # compiled module's eager wrapper runs the fence instead (see _lookup).
    if torch.compiler.is_compiling():
        return
    if _armed:
        snapshot = _lookup(module)
        if snapshot is not None:
            snapshot.fence_forward()


def _forward_post(module: torch.nn.Module, args: Any, output: Any) -> None:
    if torch.compiler.is_compiling() or not _armed:
        return
    snapshot = _lookup(module)
    if snapshot is None:
        return

    def before_backward(grad: torch.Tensor) -> None:
        snapshot.fence_all()

    for leaf in tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            leaf.register_hook(before_backward)


def _optimizer_pre(optimizer: Any, args: Any, kwargs: Any) -> None:
    if torch.compiler.is_compiling():
        return  # a compiled step is still fenced by the backward hook before it
    for _, snapshot in list(_armed.values()):
        snapshot.fence_all()


def _install() -> None:
    global _installed
    if not _installed:
        register_module_forward_pre_hook(_forward_pre)
        register_module_forward_hook(_forward_post)
        register_optimizer_step_pre_hook(_optimizer_pre)
        _installed = True


def arm(model: torch.nn.Module, snapshot: Snapshot) -> None:
    """Fence ``model``'s next forward/backward and every optimizer step on ``snapshot``."""
    with _lock:
        _install()
        _armed[id(model)] = (weakref.ref(model), snapshot)


def disarm(model: torch.nn.Module, snapshot: Snapshot) -> None:
    """Stop fencing on ``snapshot`` (called once it is staged)."""
    with _lock:
        entry = _armed.get(id(model))
        if entry is not None and entry[1] is snapshot:
            del _armed[id(model)]


def armed_count() -> int:
    """Number of models whose fences are active (for tests and diagnostics)."""
    return len(_armed)
