"""``save_checkpoint(..., integrated_save=...)`` (tests src/torchaux/checkpoint/integrated.py).

The process-group cases spawn 2 gloo ranks with an FSDP2 ``fully_shard``
model on a CPU mesh (workers in ``integrated_workers.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import integrated_workers
import torchaux
from torchaux.checkpoint import integrated


def test_plain_state_is_unaffected(tmp_path: Path) -> None:
    """Without DTensors (always so without a process group) True and False write the same bytes."""
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "m.ckpt", tmp_path / "b" / "m.ckpt"  # the archive name is the file's
    torchaux.save_checkpoint(state, a, integrated_save=True, crc_check=True)
    torchaux.save_checkpoint(state, b, integrated_save=False, crc_check=True)
    assert a.read_bytes() == b.read_bytes()
    assert not integrated.has_dtensors(state)


@pytest.mark.parametrize("bad", [1, 0, "yes", None])
def test_integrated_save_must_be_a_bool(tmp_path: Path, bad: object) -> None:
    with pytest.raises(TypeError, match="integrated_save must be a bool"):
        torchaux.save_checkpoint({"w": torch.ones(1)}, tmp_path / "m.ckpt", integrated_save=bad)
    assert not (tmp_path / "m.ckpt").exists()


@pytest.mark.multiprocess
def test_true_rank0_writes_one_full_file(tmp_path: Path) -> None:
    """ckpt+CRC (sync), safetensors+AES-GCM+choice_func (async), plain safetensors: all full."""
    integrated_workers.run("integrated", 2, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "full.ckpt", "full.safetensors", "full2.safetensors"]


@pytest.mark.multiprocess
def test_false_every_rank_writes_its_local_shards(tmp_path: Path) -> None:
    integrated_workers.run("local", 2, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.ckpt", "rank0.ckpt", "rank1.ckpt"]


@pytest.mark.multiprocess
def test_writer_failure_reaches_every_rank(tmp_path: Path) -> None:
    integrated_workers.run("writer_fails", 2, str(tmp_path))
