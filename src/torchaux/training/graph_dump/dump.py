"""Dump a tensor to a file from eager code, ``torch.compile`` graphs and CUDA graphs.

``print`` and ``torch.save`` are how one looks at an intermediate tensor, but
neither survives a captured graph: inside ``torch.compile(fullgraph=True)``
Dynamo cannot trace them (a graph break, or an error with ``fullgraph``), and
a replayed CUDA graph runs no Python at all.  :func:`save_graph_tensor` makes
the dump an operator of the graph instead.  torch_npu's
``save_npugraph_tensor`` does the same for Ascend graphs; its naming rules
are kept (see "File names").

How each kind of graph keeps the dump:

* ``torch.compile``: the dump is the custom operator
  ``torchaux_v1::save_graph_tensor(Tensor tensor, *, str? save_path=None) -> ()``
  (also reachable as ``torch.ops.torchaux_v1.save_graph_tensor``).  Dynamo
  puts a call to it into the graph (no graph break).  It has no outputs, so
  AOTAutograd and Inductor would delete it as dead code; it is registered with
  ``torch.fx.node.has_side_effect``, which keeps it with both backends (on
  torch 2.13 an unmarked copy is deleted; tests/training/test_graph_dump.py
  keeps that negative control).  We chose this over an ORDERED effect
  (``CustomOpDef.register_effect``), which threads effect tokens through the
  graph: tokens are CPU tensors (``new_token_tensor`` in
  torch/_higher_order_ops/effects.py) and Inductor skips or partitions CUDA
  graphs around CPU nodes (torch/_inductor/cudagraph_utils.py), while a plain
  side-effect node leaves the graph as it was.  The torch_npu operator is
  marked the same way.  The namespace is versioned: Inductor's caches do not
  key on the marking, so a changed registration needs a new name (research
  notes B.2).
* Values: when the operator runs, the value is copied to host memory on the
  calling thread (a CPU tensor is cloned; a device tensor goes through
  :func:`torchaux.checkpoint.api.save_async` staging), so in-place updates
  made after the dump never reach the file.  Inductor calls the operator
  before any later kernel that reuses the buffer.
* Writing: a CPU dump's copy is queued (:mod:`.writer`); a drain thread hands
  it to a background :class:`AsyncSaver` of this module, which writes it
  atomically and in torch.save format whatever the suffix, so the caller pays
  one copy, not the pickling and staging.  :func:`torchaux.wait_saves` waits
  for the queue and the writes and re-raises a failed write.
* CUDA graph capture (``torch.cuda.graph`` or ``mode="reduce-overhead"``): see
  :mod:`torchaux.training.graph_dump.cuda`; every replay writes a new file.

File names (the torch_npu page's rules, plus a sequence number):

* ``save_path`` must end in ``.pt`` or ``.bin``; missing directories are
  created; relative paths are resolved against the working directory at the
  dump.
* ``_device_<index>`` is appended to the stem: ``x.pt`` becomes
  ``x_device_0.pt``.  The index is the tensor's device index.  A CPU tensor
  gets the current accelerator index if this process has initialised its
  accelerator (so the ranks of a multi-device job write different files),
  else 0; the check itself never initialises the accelerator.
* The first dump to a name in this process writes it as is; later dumps to the
  same name add ``_1``, ``_2``, ...: ``x_device_0_1.pt``.  So repeated calls
  and CUDA graph replays never overwrite each other.  The counter lives in the
  process: a second run overwrites the files of the first.
* Without ``save_path`` the file is ``tensor_<YYYYmmddHHMMSSffffff>_device_<i>.pt``
  in the current directory (local time of the dump).

What a file holds: a tensor with the dumped value, dtype and shape (compact:
a view is saved without the rest of its storage; ``requires_grad`` is
dropped).  Eager dumps of a device tensor load back onto that device, as with
``torch.save`` (pass ``map_location="cpu"`` elsewhere); dumps replayed from a
CUDA graph hold CPU tensors.
"""

from __future__ import annotations

import datetime
import functools
import os
import threading
from dataclasses import dataclass

import torch

from torchaux.checkpoint.api import save_async
from torchaux.training.graph_dump import cuda as graph_dump_cuda
from torchaux.training.graph_dump.writer import QUEUE_DEPTH, _DumpSaver

__all__ = ["save_graph_tensor", "save_npugraph_tensor"]

#: Qualified name of the dump operator.  Bump the version whenever its schema
#: or side-effect registration changes (compiled-graph caches keep old graphs).
OP_QUALNAME = "torchaux_v1::save_graph_tensor"

_SCHEMA = "(Tensor tensor, *, str? save_path=None) -> ()"
_SUFFIXES = (".pt", ".bin")

# Dumps whose host copies may wait for the writer before a new dump blocks.
# Generous, so a burst of dumps (one per layer, or per replay) costs the hot
# path only its copies; each pending dump holds one host copy of its tensor.
_MAX_PENDING_DUMPS = QUEUE_DEPTH


def _check_path(save_path: object) -> str | None:
    """Validate ``save_path`` without touching the file system; return it as str.

    Plain string work, so Dynamo traces it without a graph break.
    """
    if save_path is None:
        return None
    if isinstance(save_path, os.PathLike):
        save_path = os.fspath(save_path)
    if not isinstance(save_path, str):
        raise TypeError(
            "save_path must be a str, an os.PathLike or None, got "
            f"{type(save_path).__name__}; pass e.g. 'dump/x.pt'"
        )
    name = os.path.basename(save_path)
    if not name:
        raise ValueError(
            f"save_path must name a file, got {save_path!r} (a directory); "
            f"pass e.g. {os.path.join(save_path, 'tensor.pt')!r}"
        )
    stem, suffix = os.path.splitext(name)
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"save_path must end in '.pt' or '.bin', got {save_path!r} (suffix "
            f"{suffix!r}); rename it, e.g. {stem + '.pt'!r}"
        )
    return save_path


def _check_tensor(tensor: object) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"save_graph_tensor expects a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(
            f"save_graph_tensor saves dense (strided) tensors, got layout {tensor.layout}; "
            "pass tensor.to_dense()"
        )
    if tensor.device.type == "meta":
        raise ValueError(
            "save_graph_tensor got a tensor on the 'meta' device, which has no values to "
            "save; dump a materialised tensor"
        )


@dataclass(frozen=True)
class _Target:
    """Where the dumps of one call site go; the final name is chosen per dump."""

    directory: str  # absolute
    stem: str | None  # None: "tensor_<timestamp>"
    suffix: str
    device_index: int


def _device_index(device: torch.device) -> int:
    if device.type != "cpu":
        return device.index if device.index is not None else 0
    # A CPU tensor has no index.  The process's accelerator tells the ranks of
    # a multi-device job apart, but only once this process has initialised it:
    # asking earlier would initialise it here, which fails in a forked child
    # (a DataLoader worker) and costs device memory in a CPU-only process.
    accelerator = torch.accelerator.current_accelerator(check_available=False)
    if accelerator is None:
        return 0
    module = torch.get_device_module(accelerator)
    is_initialized = getattr(module, "is_initialized", None)
    if is_initialized is None or not is_initialized():
        return 0
    return torch.accelerator.current_device_index()


def _resolve(save_path: str | None, device: torch.device) -> _Target:
    index = _device_index(device)
    if save_path is None:
        return _Target(os.getcwd(), None, ".pt", index)
    directory, name = os.path.split(os.path.abspath(save_path))
    stem, suffix = os.path.splitext(name)
    return _Target(directory, stem, suffix, index)


_sequence: dict[tuple[str, str, str], int] = {}
_sequence_lock = threading.Lock()


def _next_path(target: _Target) -> str:
    """The file for the next dump to ``target``: ``_device_<i>``, then ``_1``, ``_2``..."""
    stem = target.stem
    if stem is None:
        stem = "tensor_" + datetime.datetime.now().strftime("%Y%m%d%H%M%S%f")
    base = f"{stem}_device_{target.device_index}"
    key = (target.directory, base, target.suffix)
    with _sequence_lock:
        count = _sequence.get(key, 0)
        _sequence[key] = count + 1
    name = base if count == 0 else f"{base}_{count}"
    return os.path.join(target.directory, name + target.suffix)


_saver: _DumpSaver | None = None
_saver_lock = threading.Lock()


def _dump_saver() -> _DumpSaver:
    global _saver
    with _saver_lock:
        if _saver is None:
            _saver = _DumpSaver(max_pending=_MAX_PENDING_DUMPS, name="torchaux-graph-dump")
        return _saver


def _write(target: _Target, tensor: torch.Tensor, *, fresh: bool = False) -> None:
    """Name the file, create its directory and hand a host copy to the writer.

    ``fresh``: ``tensor`` is already a copy nobody else holds (a snapshot or :func:`_compact`);
    otherwise (a CUDA graph replay's reused host buffer) a CPU tensor is copied here.
    """
    path = _next_path(target)
    try:
        os.makedirs(target.directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ValueError(
            f"save_graph_tensor cannot create directory {target.directory!r}: a file is in "
            "the way; choose another save_path"
        ) from exc
    if tensor.device.type == "cpu":
        # The caller pays one copy (the snapshot); pickling, staging and the
        # write run on the dump queue's thread (training/graph_dump/writer.py).
        saver = _dump_saver()
        saver.enqueue(tensor if fresh else saver.snapshot(tensor), path)
    else:  # device tensors: save_async's staging copies them on a side stream
        save_async(tensor, path, saver=_dump_saver())


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A device ``tensor`` without autograd history, lazy conj/neg bits or unrelated storage.

    (CPU dumps are copied by the dump queue's :meth:`~.writer._DumpSaver.snapshot` instead.)
    """
    tensor = tensor.detach().resolve_conj().resolve_neg()
    own_bytes = tensor.numel() * tensor.element_size()
    if (
        tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == own_bytes
    ):
        return tensor
    # torch.save writes whole storages; a slice of a large buffer would drag
    # the rest of it into the file.
    return tensor.clone(memory_format=torch.contiguous_format)


def _kernel(tensor: torch.Tensor, *, save_path: str | None = None) -> None:
    """The operator's implementation, for every device (runs at graph run time)."""
    save_path = _check_path(save_path)
    _check_tensor(tensor)
    target = _resolve(save_path, tensor.device)
    if graph_dump_cuda.is_capturing(tensor.device):
        # Create the saver now: wait_saves() only asks existing savers, and a
        # replay's callback may fail before it would create one.
        _dump_saver()
        graph_dump_cuda.record_dump(tensor, functools.partial(_write, target))
    elif tensor.device.type == "cpu":
        _write(target, _dump_saver().snapshot(tensor.detach().resolve_conj().resolve_neg()),
               fresh=True)
    else:
        _write(target, _compact(tensor), fresh=True)


def _fake(tensor: torch.Tensor, *, save_path: str | None = None) -> None:
    # Runs while a graph is traced: reject a bad path at compile time.
    _check_path(save_path)


def _find_op(qualname: str) -> torch._ops.OpOverload | None:
    namespace, name = qualname.split("::")
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
    except AttributeError:
        return None
    overload: torch._ops.OpOverload = packet.default
    return overload


def _define_op(qualname: str, *, side_effect: bool) -> torch._ops.OpOverload:
    """Register the dump operator under ``qualname`` once; return its overload.

    A second import of this module (a reload, or a copy under another name)
    finds the operator already registered and reuses it.  ``side_effect=False``
    exists for the negative-control test only.
    """
    op = _find_op(qualname)
    if op is None:
        torch.library.custom_op(qualname, _kernel, mutates_args=(), schema=_SCHEMA).register_fake(
            _fake
        )
        op = _find_op(qualname)
        assert op is not None, f"{qualname} missing right after registration"
    if side_effect:
        # Without this, an operator with no outputs is dead code to FX, AOTAutograd
        # and Inductor (research notes B.2, verified on torch 2.13).
        torch.fx.node.has_side_effect(op)
    return op


_OP = _define_op(OP_QUALNAME, side_effect=True)


def save_graph_tensor(
    tensor: torch.Tensor, save_path: str | os.PathLike[str] | None = None
) -> None:
    """Save ``tensor``'s value, dtype and shape to a ``torch.load``-able file.

    Works in eager code, inside ``torch.compile(fullgraph=True)`` (no graph
    break) and inside CUDA graph capture (every replay writes a new file).
    The value is the one at this point of the program, even if the tensor is
    changed in place later.  The file is written in the background; call
    :func:`torchaux.wait_saves` before reading it.

    Args:
        tensor: a dense tensor on any device.
        save_path: file path ending in ``.pt`` or ``.bin``;
            ``_device_<index>`` (and from the second dump to the same name on,
            ``_<n>``) is added before the suffix.  ``None``: a
            ``tensor_<timestamp>_device_<index>.pt`` file in the current
            directory.

    Raises:
        TypeError: ``tensor`` is not a tensor, or ``save_path`` is not a
            str/PathLike.
        ValueError: bad suffix, no file name, a sparse or meta tensor, or a
            file where a directory should be created.  Raised before any file
            is written.  Inside ``torch.compile(fullgraph=True)`` Dynamo
            reports a bad argument as ``torch._dynamo.exc.Unsupported``
            quoting this message.
        Exception: the unobserved failure of an earlier dump's write.

    Example:
        >>> import os, torch, torchaux
        >>> path = os.path.join(doctest_tmp, "x.pt")
        >>> x = torch.arange(3.0)
        >>> save_graph_tensor(x, path)
        >>> _ = x.add_(10)  # the first file keeps [0., 1., 2.]
        >>> save_graph_tensor(x[1:], path)
        >>> torchaux.wait_saves()
        >>> sorted(os.listdir(doctest_tmp))
        ['x_device_0.pt', 'x_device_0_1.pt']
        >>> torch.load(os.path.join(doctest_tmp, "x_device_0.pt"))
        tensor([0., 1., 2.])
        >>> torch.load(os.path.join(doctest_tmp, "x_device_0_1.pt"))
        tensor([11., 12.])

        Inside ``torch.compile(fullgraph=True)`` the call is the same: write
        ``save_graph_tensor(y, "dump/y.pt")`` in the compiled function.
    """
    path = _check_path(save_path)
    _check_tensor(tensor)
    if _plain_eager(tensor):
        # Nothing traces this call: run the kernel directly.  The operator's
        # dispatch would cost the caller microseconds per dump and, on the first
        # call, the import of torch._dynamo (about 1.2 s here, the review's g5).
        _kernel(tensor, save_path=path)
    else:
        _OP(tensor, save_path=path)


def _plain_eager(tensor: torch.Tensor) -> bool:
    """True when no compiler, tracer, mode or tensor subclass could want to see the operator."""
    return (
        type(tensor) in (torch.Tensor, torch.nn.Parameter)
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._len_torch_function_stack() == 0
    )


#: The torch_npu name, for code written against ``torch_npu.save_npugraph_tensor``.
save_npugraph_tensor = save_graph_tensor
