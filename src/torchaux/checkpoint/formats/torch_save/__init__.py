"""The torch.save file format (a zip archive of a pickle and raw storage records).

* :mod:`~torchaux.checkpoint.formats.torch_save.writer` — pickle and records, as torch.save lays them out;
* :mod:`~torchaux.checkpoint.formats.torch_save.container` — the zip container torch reads;
* :mod:`~torchaux.checkpoint.formats.torch_save.integrity` — torchaux's content-CRC member.
"""

from torchaux.checkpoint.formats.torch_save.writer import archive_name_for, write_torch_save

__all__ = ["archive_name_for", "write_torch_save"]
