"""A storage of a tensor's own size that aliases a larger buffer (for combined tensors).

Example:
    >>> import torch
    >>> flat = torch.arange(8, dtype=torch.uint8)
    >>> s = own_storage(flat, 2, 4)
    >>> s.nbytes(), s.data_ptr() == flat.data_ptr() + 2
    (4, True)
"""

from __future__ import annotations

import torch

__all__ = ["own_storage"]


def own_storage(raw: torch.Tensor, begin: int, nbytes: int) -> torch.UntypedStorage | None:
    """A storage of exactly ``nbytes`` aliasing ``raw[begin:]``, keeping ``raw`` alive.

    PyTorch has no public storage view; ``torch.from_dlpack`` makes a storage of
    the capsule's size whose deleter holds the source tensor (``at::fromDLPack``,
    aten/src/ATen/DLConvertor.cpp).  None without DLPack (meta, some plugins).
    """
    if nbytes == 0:  # an empty capsule has no address; stay inside the buffer instead
        return None
    try:
        return torch.from_dlpack(raw[begin : begin + nbytes]).untyped_storage()
    except (BufferError, RuntimeError, TypeError, ValueError):
        return None
