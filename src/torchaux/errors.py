"""Every exception torchaux raises on purpose.

Callers catch the builtin they would naturally expect (``ValueError`` for a
corrupt file, ``TypeError`` for a wrong argument type) or our base class
:class:`CheckpointError` to catch everything checkpoint-related.  Background
failures of asynchronous saves are re-raised as the *original* exception
object, never re-wrapped or stringified.
"""

from __future__ import annotations

import io

__all__ = [
    "CheckpointError",
    "IntegrityError",
    "DecryptionError",
    "UnsupportedFormatError",
    "SaveClosedError",
    "TensorChangedError",
    "InvalidArgumentError",
    "InvalidTargetError",
    "NotWritableError",
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


class TensorChangedError(CheckpointError, RuntimeError):
    """A tensor of a ``save_async(model=...)`` snapshot changed in place before it was copied.

    The save is not committed; the previous checkpoint is untouched.
    """


class InvalidArgumentError(CheckpointError, TypeError, AttributeError):
    """An argument lacks what a save needs (a target without ``write``, a ``pickle_module`` without ``Pickler``).

    An ``AttributeError`` as ``torch.save`` raises there, and a ``TypeError``.
    """


class InvalidTargetError(CheckpointError, ValueError, RuntimeError):
    """A path target that cannot be written: empty, a directory, a missing parent, not a regular file.

    A ``ValueError``, and a ``RuntimeError`` as ``torch.save``'s zip writer raises there.
    """


class NotWritableError(CheckpointError, io.UnsupportedOperation):
    """A file object that is not open for writing (``io.UnsupportedOperation``, as ``torch.save``)."""
