"""Every exception torchaux raises on purpose.

Callers catch the builtin they would naturally expect (``ValueError`` for a
corrupt file, ``TypeError`` for a wrong argument type) or our base class
:class:`CheckpointError` to catch everything checkpoint-related.  Background
failures of asynchronous saves are re-raised as the *original* exception
object, never re-wrapped or stringified.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "IntegrityError",
    "DecryptionError",
    "UnsupportedFormatError",
    "SaveClosedError",
]


class CheckpointError(Exception):
    """Base class of every checkpoint error torchaux raises on purpose."""


class IntegrityError(CheckpointError, ValueError):
    """A checkpoint is truncated, corrupt or fails its checksum."""


class DecryptionError(IntegrityError):
    """An encrypted checkpoint cannot be decrypted: wrong key or tampered bytes."""


class UnsupportedFormatError(CheckpointError, ValueError):
    """A format, format version or transform that this torchaux does not know."""


class SaveClosedError(CheckpointError, RuntimeError):
    """A save was submitted to a saver that has been closed."""
