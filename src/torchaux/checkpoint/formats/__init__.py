"""On-disk formats torchaux writes."""

from torchaux.checkpoint.formats.torch_save import write_torch_save

__all__ = ["write_torch_save"]
