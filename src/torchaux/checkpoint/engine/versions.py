"""The safety net behind ``model=`` fences: tensor version counters.

Every in-place operation on a tensor bumps its version counter
(``tensor._version``, shared by a tensor and its views and ``detach()``ed
aliases; see the PyTorch autograd notes, "In-place correctness checks").
A deferred (``model=``) snapshot records the counter of every tensor it
pickled at the call and compares it when that tensor's storage has been
copied.  A changed counter means the tensor was modified in place between
the call and its copy: the copy may mix old and new values, so the save
fails with :class:`~torchaux.errors.TensorChangedError` instead of writing
a mixed file.

What it cannot see (documented in :func:`torchaux.save_async` too):
writes through ``tensor.data`` (a fresh alias with its own counter),
writes through raw pointers (numpy views, DLPack, custom kernels that do not
bump the counter), inference tensors (no counter), and an in-place kernel
still running when the copy is checked (the counter is bumped when the
kernel returns).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from torchaux.errors import TensorChangedError

__all__ = ["TrackedTensor", "trackable", "track", "changed", "describe"]

#: ``(tensor, its _version at the call)``
TrackedTensor = tuple[torch.Tensor, int]


def trackable(t: torch.Tensor) -> bool:
    """Whether ``t``'s version counter guards its data (a dense tensor with a counter).

    Only dense tensors with their own storage are tracked; sparse, nested
    and wrapper-subclass tensors pickle their data through component
    tensors, which are tracked themselves; inference tensors have no counter.

    >>> trackable(torch.ones(2)), trackable(torch.ones(2).to_sparse())
    (True, False)
    """
    return t.layout is torch.strided and not (t.is_nested or t.is_inference() or t.is_meta)


def _storage_cdata(t: torch.Tensor) -> int | None:
    if not trackable(t):
        return None
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError):
        # A tensor subclass without a plain storage (e.g. a functional wrapper):
        # not trackable, and its components are tracked on their own.
        return None


def track(
    tensors: Iterable[torch.Tensor], key_of: dict[int, str]
) -> dict[str, list[TrackedTensor]]:
    """Group ``tensors`` by storage key (``key_of``: storage ``_cdata`` -> key) with their versions.

    >>> t = torch.ones(2)
    >>> tracked = track([t, t[1:]], {t.untyped_storage()._cdata: "0"})
    >>> [v for _, v in tracked["0"]]
    [0, 0]
    """
    out: dict[str, list[TrackedTensor]] = {}
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        cdata = _storage_cdata(t)
        key = key_of.get(cdata) if cdata is not None else None
        if key is not None:
            out.setdefault(key, []).append((t, t._version))
    return out


def changed(
    tracked: list[TrackedTensor], key: str, obj: object
) -> TensorChangedError | None:
    """The error to fail the save with if a tensor of storage ``key`` changed, else None.

    >>> t = torch.zeros(2)
    >>> entries = track([t], {t.untyped_storage()._cdata: "0"})["0"]
    >>> changed(entries, "0", {"w": t}) is None
    True
    >>> _ = t.add_(1)
    >>> print(changed(entries, "0", {"w": t}))  # doctest: +ELLIPSIS
    save_async(model=...): tensor 'w' was modified in place ... eager mode ...
    """
    for t, version in tracked:
        if t._version != version:
            return TensorChangedError(
                f"save_async(model=...): tensor {describe(t, obj)} was modified in place "
                f"after the call and before its copy into the snapshot (version {version} at "
                f"the call, {t._version} at the copy), so the file would mix old and new "
                "values; the save was not committed and the previous checkpoint is intact. "
                "Save in eager mode (no model=), call handle.staged.result() before "
                "updating it, or make the update inside model's forward, backward, "
                "optimizer.step() or model.load_state_dict(), which are fenced"
            )
    return None


def describe(t: torch.Tensor, obj: object, limit: int = 100_000) -> str:
    """A name for ``t``: its path inside ``obj`` (dicts, lists, tuples), else shape and dtype.

    >>> w = torch.ones(2)
    >>> describe(w, {"model": {"w": w}})
    "'model.w'"
    >>> describe(torch.ones(3), {})
    'of shape (3,) and dtype torch.float32'
    """
    stack: list[tuple[str, Any]] = [("", obj)]
    visited = 0
    while stack and visited < limit:  # bounded: naming must never cost more than the save
        prefix, node = stack.pop()
        visited += 1
        if node is t:
            return repr(prefix or "<the saved object>")
        if isinstance(node, dict):
            items: Iterable[tuple[object, Any]] = node.items()
        elif isinstance(node, (list, tuple)):
            items = enumerate(node)
        else:
            continue
        for k, v in items:
            stack.append((f"{prefix}.{k}" if prefix else str(k), v))
    return f"of shape {tuple(t.shape)} and dtype {t.dtype}"
