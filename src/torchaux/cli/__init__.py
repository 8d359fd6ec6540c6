"""Command line interface (``torchaux bench``)."""

from torchaux.cli.main import main

__all__ = ["main"]
