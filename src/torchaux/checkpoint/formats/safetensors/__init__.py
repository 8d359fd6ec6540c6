"""The safetensors file format.

* :mod:`~torchaux.checkpoint.formats.safetensors.writer` — writing, the CRC metadata, sniffing;
* :mod:`~torchaux.checkpoint.formats.safetensors.header` — the dtype table and the strict header parser;
* :mod:`~torchaux.checkpoint.formats.safetensors.reader` — a strict reader of untrusted files.
"""

from torchaux.checkpoint.formats.safetensors.reader import read_safetensors
from torchaux.checkpoint.formats.safetensors.writer import sniff_safetensors, write_safetensors

__all__ = ["read_safetensors", "sniff_safetensors", "write_safetensors"]
