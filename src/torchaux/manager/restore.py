"""Reading a committed step back: the whole object, or copied into a live state in place."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, MutableSequence
from typing import Any

import torch

from torchaux.manager.local_store import LocalStore
from torchaux.manager.remote_store import RemoteStore
from torchaux.manager.sharded import load_sharded
from torchaux.manager.steps import LAYOUT_SHARDED, StepInfo

__all__ = ["copy_into", "load_file", "load_step"]


def load_step(
    store: LocalStore | RemoteStore, info: StepInfo, state: Any, *, enc_key: bytes | None,
    storage_options: dict[str, Any] | None, map_location: Any, group: Any = None,
) -> Any:
    """Load a committed step of either layout; into ``state`` in place if given.

    A distributed step reshards into ``state`` (``group``: the ranks loading
    together, None for one process); a one-file step is copied into it.
    """
    if info.layout == LAYOUT_SHARDED:
        return load_sharded(store.step_path(info.step), info, state, process_group=group,
                            dec_key=enc_key, storage_options=storage_options)
    loaded = load_file(store, info, enc_key=enc_key, storage_options=storage_options,
                       map_location=map_location)
    return loaded if state is None else copy_into(state, loaded)


def load_file(
    store: LocalStore | RemoteStore, info: StepInfo, *, enc_key: bytes | None,
    storage_options: dict[str, Any] | None, map_location: Any,
) -> Any:
    """Load a one-file step (:data:`~torchaux.manager.steps.LAYOUT_FILE`) whole."""
    if info.encrypted is None:
        with store.open_state(info.step) as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    if enc_key is None:
        raise ValueError(f"step {info.step} is encrypted ({info.encrypted}); pass enc_key")
    from torchaux.checkpoint.load import load_checkpoint

    extra = {"storage_options": storage_options} if storage_options else {}
    return load_checkpoint(
        store.state_path(info.step), dec_key=enc_key, dec_mode=info.encrypted,
        map_location=map_location, **extra,
    )


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
