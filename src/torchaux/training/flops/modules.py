"""Which ``nn.Module``s are running right now, forward or backward: the per-module attribution.

Why not ``torch.utils.module_tracker.ModuleTracker`` (what ``FlopCounterMode``
uses): Dynamo traces into its global hooks when a module is first compiled
while it is active and fails ("already tracked for mutation", reproduced with
torch 2.13 and aot_eager; cf. pytorch #128199), it keeps one handle per module
call until it exits, and its state is a plain set mutated from autograd threads.
This tracker follows the same scheme -- global forward pre/post hooks, and
``register_multi_grad_hook`` on a module's outputs (its backward starts) and
inputs (its backward ends) -- but is built to leave torch.compile alone:

* Dynamo guards on the global module hooks it traces: the number of hooks,
  each hook's code object, and every global a hook reads
  (``torch/_dynamo/variables/nn_module.py``).  Installing hooks for a counting
  session and removing them at ``stop()`` would therefore make every frame
  compiled in between compile again afterwards.  So the two hooks are
  module-level functions, installed on first use **for the life of the
  process** (a no-op costing about a microsecond per module call while no
  session is active), and their first statement returns under
  ``torch.compiler.is_compiling()``, so Dynamo inlines them as no-ops without
  reading (or guarding on) any state.  Frames compiled before the first
  installation while *other* global module hooks existed compile once more.
* Compiled regions are therefore attributed to the eager module that calls
  them; an ``OptimizedModule`` is named after the module it wraps, and FX
  ``GraphModule``s run by compiler backends are not tracked.
* Grad-hook handles are not kept (the hooks die with the autograd graph and do
  nothing once their session has ended).
* Forward and backward scopes are counted separately under a lock; only the
  backward ones are cleared when a backward pass ends (an engine callback,
  needed because a module whose inputs need no grad never sees its "backward
  ends" hook).
* Two deviations from ``ModuleTracker`` (both reproduced with torch 2.13):
  only modules run by the thread that entered the session are tracked (the
  hooks are process-wide, so ``ModuleTracker`` also charges a background
  thread's modules with the counting thread's FLOPs), and a module whose
  forward raises leaves its scope (the post hook is ``always_call``; upstream
  keeps the scope open and charges it with everything that runs afterwards).

Names match ``ModuleTracker``'s: the class name of the outermost module, then
attribute paths (``"Sequential.0.attn"``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._pytree import tree_flatten

__all__ = ["ModuleScopes"]

#: Key that every count is also attributed to (``FlopCounterMode``'s name for it).
GLOBAL = "Global"

_install_lock = threading.Lock()
_installed = False
_active: ModuleScopes | None = None


def _pre_hook(module: nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():  # must stay first: see the module docstring
        return
    scopes = _active
    if scopes is not None:
        scopes._forward_starts(module, args)


def _post_hook(module: nn.Module, args: Any, output: Any) -> None:
    if torch.compiler.is_compiling():  # must stay first: see the module docstring
        return
    scopes = _active
    if scopes is not None:
        scopes._forward_ends(module, output)


def _install_once() -> None:
    global _installed
    with _install_lock:
        if not _installed:
            nn.modules.module.register_module_forward_pre_hook(_pre_hook)
            # always_call: the hook also runs when forward raises, so a failed
            # forward closes its scope (torch/nn/modules/module.py, _call_impl).
            nn.modules.module.register_module_forward_hook(_post_hook, always_call=True)
            _installed = True


def _grad_tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


class ModuleScopes:
    """One session of module tracking; at most one is active per process.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> seen = []
        >>> with ModuleScopes() as scopes:
        ...     _ = net[0].register_forward_pre_hook(lambda *a: seen.append(scopes.current()))
        ...     _ = net(torch.ones(1, 2))
        >>> seen
        [('Global', 'Sequential', 'Sequential.0')]
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._forward: dict[str, int] = {}
        self._backward: dict[str, int] = {}
        self._reset_queued = False
        self._live = False
        self._names: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self._expanded: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._thread: int | None = None

    def current(self) -> tuple[str, ...]:
        """``"Global"`` and the names of the modules running now (forward or backward)."""
        with self._lock:
            return (GLOBAL, *sorted(self._forward.keys() | self._backward.keys()))

    def __enter__(self) -> ModuleScopes:
        global _active
        _install_once()
        with _install_lock:
            if _active is not None:
                raise RuntimeError(
                    "another ModuleScopes session is active; exit it first (the global "
                    "module hooks feed one session at a time)"
                )
            self._live = True
            self._thread = threading.get_ident()
            _active = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _active
        with _install_lock:
            if _active is self:
                _active = None
        self._live = False
        with self._lock:
            self._forward.clear()
            self._backward.clear()

    # -- naming --------------------------------------------------------------------------

    def _name(self, module: nn.Module) -> str | None:
        if isinstance(module, torch.fx.GraphModule):
            return None
        original = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(original, nn.Module):
            module = original
        name = self._names.get(module)
        if name is None:
            name = self._names[module] = type(module).__name__
        if module not in self._expanded:
            self._expanded.add(module)
            self._name_children(module, name)
        return name

    def _name_children(self, module: nn.Module, name: str) -> None:
        for child_name, child in module.named_children():
            self._names[child] = f"{name}.{child_name}"
            self._expanded.add(child)
            self._name_children(child, f"{name}.{child_name}")

    # -- scope bookkeeping ---------------------------------------------------------------

    def _enter(self, scopes: dict[str, int], name: str) -> None:
        with self._lock:
            scopes[name] = scopes.get(name, 0) + 1

    def _leave(self, scopes: dict[str, int], name: str) -> None:
        with self._lock:
            depth = scopes.get(name, 0)
            if depth <= 1:
                scopes.pop(name, None)
            else:
                scopes[name] = depth - 1

    def _forward_starts(self, module: nn.Module, args: Any) -> None:
        # Only the counting thread's modules: the hooks are process-wide, and a
        # module running on another thread does not run under the counter's mode.
        if threading.get_ident() != self._thread:
            return
        name = self._name(module)
        if name is None:
            return
        self._enter(self._forward, name)
        inputs = _grad_tensors(args)
        if inputs:

            def backward_ends(grads: Sequence[torch.Tensor | None]) -> None:
                if self._live:
                    self._leave(self._backward, name)

            register_multi_grad_hook(inputs, backward_ends)

    def _forward_ends(self, module: nn.Module, output: Any) -> None:
        if threading.get_ident() != self._thread:
            return
        name = self._name(module)
        if name is None:
            return
        self._leave(self._forward, name)
        outputs = _grad_tensors(output)
        if outputs:

            def backward_starts(grads: Sequence[torch.Tensor | None]) -> None:
                if self._live:
                    self._backward_starts(name)

            register_multi_grad_hook(outputs, backward_starts)

    def _backward_starts(self, name: str) -> None:
        with self._lock:
            queue = not self._reset_queued
            self._reset_queued = True
        if queue:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        self._enter(self._backward, name)

    def _backward_done(self) -> None:
        with self._lock:
            self._backward.clear()
            self._reset_queued = False
