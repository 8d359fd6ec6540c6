"""Reading a committed step back: the whole object, or copied into a live state in place."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, MutableSequence
from typing import Any

import torch

__all__ = ["copy_into"]


def copy_into(target: Any, loaded: Any, where: str = "state") -> Any:
    """Copy ``loaded`` into ``target`` in place where both hold tensors; return ``target``.

    Tensors are copied with ``Tensor.copy_`` (so views, parameters and
    pre-allocated device tensors keep their storage); dicts and lists are
    walked; any other value replaces the old one in its container.

    Raises:
        ValueError: shapes differ, or a key/length of ``target`` is missing
            from the checkpoint.

    Example:
        >>> live = {"w": torch.zeros(2), "step": 0}
        >>> w = live["w"]
        >>> _ = copy_into(live, {"w": torch.ones(2), "step": 5})
        >>> w.tolist(), live["step"]
        ([1.0, 1.0], 5)
    """
    if isinstance(target, torch.Tensor) and isinstance(loaded, torch.Tensor):
        if target.shape != loaded.shape:
            raise ValueError(
                f"{where}: checkpoint shape {tuple(loaded.shape)} does not match the live "
                f"tensor's {tuple(target.shape)}; is it the same model?"
            )
        with torch.no_grad():
            target.copy_(loaded)
        return target
    if isinstance(target, MutableMapping) and isinstance(loaded, Mapping):
        missing = [k for k in target if k not in loaded]
        if missing:
            raise ValueError(
                f"{where}: the checkpoint has no entries {missing[:5]}; restore without state= "
                "to see what it holds"
            )
        for key, value in loaded.items():
            if key in target:
                target[key] = copy_into(target[key], value, f"{where}[{key!r}]")
            else:
                target[key] = value
        return target
    if isinstance(target, MutableSequence) and isinstance(loaded, (list, tuple)):
        if len(target) != len(loaded):
            raise ValueError(
                f"{where}: the checkpoint holds {len(loaded)} items, the live state {len(target)}"
            )
        for i, value in enumerate(loaded):
            target[i] = copy_into(target[i], value, f"{where}[{i}]")
        return target
    return loaded
