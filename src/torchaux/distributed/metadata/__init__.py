"""A DCP ``.metadata``: unpickled with an allow-list (:mod:`.unpickle`), then checked (:mod:`.check`)."""

from torchaux.distributed.metadata.check import check_metadata
from torchaux.distributed.metadata.unpickle import metadata_path, parse_metadata, read_metadata

__all__ = ["check_metadata", "metadata_path", "parse_metadata", "read_metadata"]
