"""Training-side fences for ``save_async(..., model=model)``.

With ``model=`` the save returns before its CPU copies are done, so the next
forward overlaps staging.  While a snapshot is staging these hooks order
every change that goes through ``model`` after the copy of what it changes;
each one copies what is still missing itself (:meth:`Snapshot.fence_upto`),
so it costs at most what eager staging would have cost at the call:

* the forward of ``model`` or of any of its submodules, called from anywhere:
  the copies of what that forward can change — the module's own buffers
  (BatchNorm statistics), and its parameters only where forward changes them
  (``nn.Embedding``/``nn.EmbeddingBag`` with ``max_norm`` renormalise their
  weight: :func:`_forward_mutable`); those tensors are copied first, so the
  rest of the copies still overlap the forward (fencing every parameter in
  forward made the training thread do most copies itself: the ``model=``
  stall went from 0.009 s to 0.025 s in ``torchaux bench``).  A compiled call
  (``torch.compile(m)``, ``m.compile()``) runs no hooks inside its graph, so
  it waits for those copies of the module's whole subtree before entering it;
* gradient accumulation into any parameter of ``model`` (a post-accumulate-grad
  hook), so a backward - also of a loss computed before the save - finishes
  only once every copy is done: hand-written updates after it are safe;
* ``model.load_state_dict(...)``: every copy;
* any ``torch.optim`` optimizer step: every copy.  A save made *inside* an
  optimizer step (from a step pre-hook) is staged eagerly instead
  (:func:`inside_optimizer_step`), since the step's pre-hooks already ran.

Anything else that changes a staged tensor in place before its copy is
caught by the version check (:mod:`.versions`) and fails the save.

Hooks live only while a snapshot is armed: the process-global module and
optimizer hooks are removed when the last one is disarmed (a global module
hook takes every ``nn.Module`` call in the process off its hook-free fast
path), and nothing is left on the model.  While armed, ``model`` carries one
load-state-dict pre-hook and its parameters one post-accumulate-grad hook each
(neither is pickled or deep-copied with the model); a compiled module's
``_compiled_call_impl`` is wrapped (``Module.__getstate__`` drops it).
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import Optimizer, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from torchaux.checkpoint.engine.staging import Snapshot

__all__ = [
    "arm", "disarm", "armed_count", "hooks_installed", "model_tensors", "inside_optimizer_step",
]


@dataclass
class _Entry:
    module: weakref.ReferenceType[torch.nn.Module]
    snapshot: Snapshot
    local: tuple[int, bool]  # (copies, devices) before the module's own forward
    tree: tuple[int, bool]  # ... before a compiled call of its whole subtree


@dataclass
class _Armed:
    snapshot: Snapshot
    module_ids: list[int]
    handles: list[RemovableHandle] = field(default_factory=list)
    root_id: int = -1  # id() of the unwrapped model (its load_state_dict is fenced)


_entries: dict[int, list[_Entry]] = {}  # id(module) -> one entry per armed snapshot
_armed: dict[int, _Armed] = {}  # id(snapshot) -> its bookkeeping
_global: list[RemovableHandle] = []
_compiled: dict[int, tuple[weakref.ReferenceType[torch.nn.Module], Any]] = {}  # id -> original
_lock = threading.Lock()


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    # torch.compile(m) returns an OptimizedModule naming m as `_orig_mod`.
    if type(module).__name__ == "OptimizedModule":
        return module._modules.get("_orig_mod") or module
    return module


def _fence(module: torch.nn.Module, compiled: bool) -> None:
    entries = _entries.get(id(module))
    if entries is None and type(module).__name__ == "OptimizedModule":
        compiled = True  # its forward is one graph over the wrapped module
        module = _unwrap(module)
        entries = _entries.get(id(module))
    for e in entries or ():
        if e.module() is module:
            n, devices = e.tree if compiled else e.local
            if n or devices:
                e.snapshot.fence_upto(n, devices=devices)


def _forward_pre(module: torch.nn.Module, args: Any) -> None:
    # Inside a graph that torch.compile traces, do nothing - and touch no
    # global state, or Dynamo would guard on it and recompile whenever a save
    # is armed or disarmed.  Compiled calls are fenced before the graph.
    if torch.compiler.is_compiling():
        return
    _fence(module, False)


class _FencedCompiledCall:
    """Stands in for ``module._compiled_call_impl`` (``Module.compile()``) while armed."""

    def __init__(self, module: torch.nn.Module, original: Any) -> None:
        self.module = weakref.ref(module)
        self.original = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module()
        if module is not None and not torch.compiler.is_compiling():
            _fence(module, True)
        return self.original(*args, **kwargs)


def _fence_all(snapshot: Snapshot, *args: Any) -> None:
    if not torch.compiler.is_compiling():
        snapshot.fence_all()


def _before_load(module: torch.nn.Module, *args: Any) -> None:
    for armed in list(_armed.values()):
        if armed.root_id == id(module):
            armed.snapshot.fence_all()


def _optimizer_pre(optimizer: Any, args: Any, kwargs: Any) -> None:
    if torch.compiler.is_compiling():
        return  # a compiled step is still fenced by the gradient hooks before it
    for armed in list(_armed.values()):
        armed.snapshot.fence_all()


_STEP_CODE = Optimizer.profile_hook_step(lambda *a, **k: None).__code__  # type: ignore[arg-type]


def inside_optimizer_step() -> bool:
    """True when called (indirectly) from an optimizer's ``step``, its pre- or post-hooks.

    >>> inside_optimizer_step()
    False
    """
    frame = sys._getframe(1)
    for _ in range(200):  # bounded walk: deep user stacks are not worth more
        if frame is None:
            return False
        if frame.f_code is _STEP_CODE:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _mutates_parameters(module: torch.nn.Module) -> bool:
    # The built-in modules whose forward writes their own parameters in place
    # (torch/nn/functional.py: embedding and embedding_bag call
    # torch.embedding_renorm_ on the weight when max_norm is set).  Any other
    # in-place write is caught by the version check.
    return isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and (
        module.max_norm is not None
    )


def _forward_mutable(module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors of ``module`` itself that its forward may change in place."""
    own = [b for b in module._buffers.values() if b is not None]
    if _mutates_parameters(module):
        own += [p for p in module._parameters.values() if p is not None]
    return own


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """``model``'s tensors in copy order: what forward may change first, then the parameters.

    Both groups in module order (the order forward reaches them).

    >>> bn = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    >>> [tuple(t.shape) for t in model_tensors(bn)][:3]  # BatchNorm's buffers come first
    [(3,), (3,), ()]
    """
    modules = list(_unwrap(model).modules())
    first = [t for m in modules for t in _forward_mutable(m)]
    seen = {id(t) for t in first}
    rest = [p for m in modules for p in m._parameters.values() if p is not None and id(p) not in seen]
    return first + rest


_Need = tuple[int, bool]  # (deferred copies, device copies) to wait for


def _needs(root: torch.nn.Module, snapshot: Snapshot) -> dict[int, tuple[torch.nn.Module, _Need, _Need]]:
    local = {}
    for m in root.modules():
        local[id(m)] = (m, snapshot.needs(_forward_mutable(m)))
    if not any(need[0] or need[1] for _, need in local.values()):
        return {}  # no forward changes anything staged (e.g. Linear layers only): no entries
    tree: dict[int, tuple[int, bool]] = {}
    stack: list[tuple[torch.nn.Module, bool]] = [(root, False)]
    while stack:  # post-order without recursion (deep models)
        m, expanded = stack.pop()
        if id(m) in tree:
            continue
        kids = [c for c in m._modules.values() if c is not None]
        if expanded or not kids:
            parts = [local[id(m)][1], *(tree.get(id(c), (0, False)) for c in kids)]
            tree[id(m)] = (max(p[0] for p in parts), any(p[1] for p in parts))
        else:
            stack.append((m, True))
            stack.extend((c, False) for c in kids if id(c) not in tree)
    return {i: (m, need, tree[i]) for i, (m, need) in local.items()}


def arm(model: torch.nn.Module, snapshot: Snapshot) -> None:
    """Fence every change through ``model`` on ``snapshot`` until :func:`disarm`."""
    root = _unwrap(model)
    needs = _needs(root, snapshot)
    with _lock:
        if not _global:
            _global.append(register_module_forward_pre_hook(_forward_pre))
            _global.append(register_optimizer_step_pre_hook(_optimizer_pre))
        armed = _Armed(snapshot, [], root_id=id(root))
        _armed[id(snapshot)] = armed
        for i, (m, local, tree) in needs.items():
            if not (tree[0] or tree[1]):
                continue
            _entries[i] = [*_entries.get(i, ()), _Entry(weakref.ref(m), snapshot, local, tree)]
            armed.module_ids.append(i)
            original = m.__dict__.get("_compiled_call_impl")
            if original is not None and not isinstance(original, _FencedCompiledCall):
                _compiled[i] = (weakref.ref(m), original)
                m.__dict__["_compiled_call_impl"] = _FencedCompiledCall(m, original)
        # Every copy before load_state_dict writes (also for a root whose
        # forward changes nothing and so has no module entry).  A module-level
        # function, not a partial holding the snapshot: torch.save(model) while
        # armed pickles the model's hooks.
        armed.handles.append(root.register_load_state_dict_pre_hook(_before_load))
        hook = functools.partial(_fence_all, snapshot)
        for p in root.parameters():
            if p.requires_grad:
                armed.handles.append(p.register_post_accumulate_grad_hook(hook))


def disarm(model: torch.nn.Module, snapshot: Snapshot) -> None:
    """Stop fencing on ``snapshot`` (called once it is staged); idempotent."""
    with _lock:
        armed = _armed.pop(id(snapshot), None)
        if armed is None:
            return
        for h in armed.handles:
            h.remove()
        for i in armed.module_ids:
            left = [e for e in _entries.get(i, ()) if e.snapshot is not snapshot]
            if left:
                _entries[i] = left
                continue
            _entries.pop(i, None)
            ref, original = _compiled.pop(i, (None, None))
            m = ref() if ref is not None else None
            if m is not None and isinstance(m.__dict__.get("_compiled_call_impl"), _FencedCompiledCall):
                m.__dict__["_compiled_call_impl"] = original
        if not _armed:
            while _global:
                _global.pop().remove()


def armed_count() -> int:
    """Number of snapshots whose fences are active (for tests and diagnostics)."""
    return len(_armed)


def hooks_installed() -> bool:
    """True while the process-global hooks are registered (for tests)."""
    return bool(_global)
