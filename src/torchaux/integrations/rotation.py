"""``save_total_limit`` for the HF callback: rotation over published ``checkpoint-<N>`` folders only.

Runs on the writer thread after a publication, so a checkpoint still being
written (``tmp-checkpoint-<N>``) is never counted or removed.
"""

from __future__ import annotations

import os
import re

from torchaux.checkpoint.storage.directory import remove_tree

__all__ = ["PUBLISHED", "rotate_published"]

#: A published checkpoint folder (HF's get_last_checkpoint regex).
PUBLISHED = re.compile(r"^checkpoint-(\d+)$")


def rotate_published(run_dir: str, limit: int | None, best: str | None) -> None:
    """``save_total_limit`` over published checkpoints (HF's rotate_checkpoints, by step number)."""
    if not limit or limit <= 0:
        return
    steps = sorted(
        (int(m.group(1)), name) for name in os.listdir(run_dir)
        if (m := PUBLISHED.match(name)) and os.path.isdir(os.path.join(run_dir, name))
    )
    paths = [os.path.join(run_dir, name) for _, name in steps]
    protected = {paths[-1]} if paths else set()
    if best is not None:
        protected.add(os.path.abspath(best))
    keep = max(limit, len(protected))
    for path in paths:
        if len(paths) <= keep:
            break
        if path not in protected:
            remove_tree(path)
            paths = [p for p in paths if p != path]
