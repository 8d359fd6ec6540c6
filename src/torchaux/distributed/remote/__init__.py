"""Distributed checkpoints under fsspec URLs: access (:mod:`.access`) and the object-store commit (:mod:`.commit`)."""

from torchaux.distributed.remote.access import RangedFile, RemoteDir, locate
from torchaux.distributed.remote.commit import (
    discard_objects,
    publish_remote,
    referenced_files,
    remove_unreferenced_objects,
)

__all__ = ["RangedFile", "RemoteDir", "discard_objects", "locate", "publish_remote",
           "referenced_files", "remove_unreferenced_objects"]
