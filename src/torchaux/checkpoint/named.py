"""Turn what users pass to ``save_checkpoint`` into one ordered ``name -> value`` dict.

MindSpore's ``save_checkpoint`` accepts a network, a dict or a list (spec
mindspore-spec.md §1.2-1.3).  The PyTorch equivalents accepted here:

* ``nn.Module``: its ``state_dict()`` (parameters *and* buffers, as a PyTorch
  user expects from a checkpoint);
* ``dict``: ``str`` names to tensors/Parameters, or to ``int``/``float``/
  ``bool``/``str`` values (what :func:`torchaux.load_checkpoint` returns);
* ``list``: of ``{"name": str, "data": tensor}`` dicts, of ``(name, tensor)``
  pairs (``list(model.named_parameters())``), or of bare tensors, which are
  named by position (``"0"``, ``"1"``, ...) because PyTorch parameters carry
  no name of their own.

``choice_func(name) -> bool`` filters the names; it is not applied to
``append_dict``, whose entries come last and overwrite a same-named entry
(MindSpore keeps the position; so does a Python dict).  Everything is checked
here, before any I/O, and every error names the offending entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["Value", "collect_named", "check_append_dict"]

#: A value a checkpoint entry may hold.
Value = torch.Tensor | int | float | bool | str

_SCALARS = (bool, int, float, str)


def _check_value(name: str, value: object, where: str) -> Value:
    if isinstance(value, torch.Tensor) or isinstance(value, _SCALARS):
        return value  # type: ignore[return-value]
    raise TypeError(
        f"{where} entry {name!r} must be a torch.Tensor (or Parameter) or an int, float, "
        f"bool or str; got {type(value).__name__}. Convert it (e.g. torch.as_tensor) or "
        "leave it out"
    )


def _check_name(name: object, where: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{where} names must be str; got {type(name).__name__} ({name!r})")
    if name == "":
        raise ValueError(f"{where} names must be non-empty strings")
    return name


def _from_list(items: list[Any]) -> list[tuple[str, Value]]:
    out: list[tuple[str, Value]] = []
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            if set(item) != {"name", "data"}:
                raise TypeError(
                    f"save_obj[{i}] must be a dict with exactly the keys 'name' and 'data'; "
                    f"got keys {sorted(map(str, item))}"
                )
            name = _check_name(item["name"], "save_obj")
            data = item["data"]
            if not isinstance(data, torch.Tensor):
                raise TypeError(
                    f"save_obj[{i}]['data'] ({name!r}) must be a torch.Tensor; got "
                    f"{type(data).__name__}"
                )
            out.append((name, data))
        elif isinstance(item, tuple) and len(item) == 2:
            name = _check_name(item[0], "save_obj")
            out.append((name, _check_value(name, item[1], "save_obj")))
        elif isinstance(item, torch.Tensor):
            out.append((str(i), item))
        else:
            raise TypeError(
                f"save_obj[{i}] must be a tensor, a (name, tensor) pair or a "
                f"{{'name': ..., 'data': ...}} dict; got {type(item).__name__}"
            )
    return out


def check_append_dict(append_dict: object) -> dict[str, Value]:
    """Validate ``append_dict`` (``None``, or ``str`` keys to tensor/int/float/bool/str).

    >>> check_append_dict({"epoch": 3, "lr": 0.1})
    {'epoch': 3, 'lr': 0.1}
    >>> check_append_dict({"opt": object()})
    Traceback (most recent call last):
    TypeError: append_dict entry 'opt' must be a torch.Tensor (or Parameter) or an int, ...
    """
    if append_dict is None:
        return {}
    if not isinstance(append_dict, Mapping):
        raise TypeError(
            f"append_dict must be a dict or None; got {type(append_dict).__name__}"
        )
    return {
        _check_name(k, "append_dict"): _check_value(k, v, "append_dict")
        for k, v in append_dict.items()
    }


def collect_named(
    save_obj: object,
    choice_func: Callable[[str], bool] | None,
    append_dict: Mapping[str, Value],
) -> dict[str, Value]:
    """The entries to save, in order: filtered ``save_obj`` entries, then ``append_dict``.

    Raises:
        TypeError: ``save_obj`` is not a module, dict or list, or holds bad entries;
            ``choice_func`` is not callable.

    Example:
        >>> layer = torch.nn.Linear(2, 1)
        >>> list(collect_named(layer, lambda n: n.endswith("weight"), {"epoch": 1}))
        ['weight', 'epoch']
    """
    if choice_func is not None and not callable(choice_func):
        raise TypeError(f"choice_func must be callable or None; got {type(choice_func).__name__}")
    if isinstance(save_obj, torch.nn.Module):
        items: list[tuple[str, Value]] = list(save_obj.state_dict().items())
    elif isinstance(save_obj, Mapping):
        items = [
            (_check_name(k, "save_obj"), _check_value(k, v, "save_obj"))
            for k, v in save_obj.items()
        ]
    elif isinstance(save_obj, (list, tuple)):
        items = _from_list(list(save_obj))
    else:
        raise TypeError(
            "save_obj must be an nn.Module, a dict of name -> tensor, or a list of tensors, "
            f"(name, tensor) pairs or {{'name', 'data'}} dicts; got {type(save_obj).__name__}"
        )
    out: dict[str, Value] = {}
    for name, value in items:
        if choice_func is None or choice_func(name):
            out[name] = value
    out.update(append_dict)
    return out
