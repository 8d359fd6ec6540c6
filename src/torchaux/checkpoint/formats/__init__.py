"""On-disk formats torchaux writes: torch.save zip (:mod:`.torch_save`), safetensors (:mod:`.safetensors`)."""

from torchaux.checkpoint.formats.safetensors import read_safetensors, write_safetensors
from torchaux.checkpoint.formats.torch_save import write_torch_save

__all__ = ["write_torch_save", "write_safetensors", "read_safetensors"]
