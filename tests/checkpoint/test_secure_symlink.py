"""A symlink at the target never redirects a save_checkpoint (security review, issue #16 item 1).

In a directory others can write, a link planted at the checkpoint path used to
make save_checkpoint overwrite (and chmod 0o600) the link's destination.
save_checkpoint now replaces the link itself; save_async keeps torch.save's
follow-the-link behaviour unless ``follow_symlinks=False``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import torchaux
from torchaux.checkpoint.storage import commit

VICTIM = b"ssh-ed25519 AAAA... victim\n"


def _plant(tmp_path: Path, name: str = "model.ckpt") -> tuple[Path, Path]:
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "authorized_keys"
    victim.write_bytes(VICTIM)
    victim.chmod(0o644)
    shared = tmp_path / "shared"
    shared.mkdir()
    link = shared / name
    link.symlink_to(victim)
    return link, victim


@pytest.mark.parametrize("enc_key", [None, bytes(32)], ids=["plain", "encrypted"])
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_save_checkpoint_replaces_a_planted_link(tmp_path: Path, enc_key: bytes | None, fmt: str) -> None:
    """The link is replaced by a regular 0o600 file; its destination keeps bytes and mode."""
    link, victim = _plant(tmp_path)
    torchaux.save_checkpoint({"w": torch.ones(2)}, link, enc_key=enc_key, format=fmt)
    assert not link.is_symlink() and link.is_file()
    assert stat.S_IMODE(link.stat().st_mode) == 0o600
    assert victim.read_bytes() == VICTIM
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert os.listdir(victim.parent) == ["authorized_keys"]
    loaded = torchaux.load_checkpoint(link, dec_key=enc_key)
    assert torch.equal(loaded["w"], torch.ones(2))


def test_save_checkpoint_async_thread_replaces_the_link(tmp_path: Path) -> None:
    link, victim = _plant(tmp_path)
    torchaux.save_checkpoint({"w": torch.ones(2)}, link, async_save=True).wait(60)
    assert not link.is_symlink() and victim.read_bytes() == VICTIM


def test_save_checkpoint_replaces_a_dangling_link(tmp_path: Path) -> None:
    """A link to a file that does not exist yet is not followed into creating it."""
    link = tmp_path / "m.ckpt"
    target = tmp_path / "elsewhere" / "planted.ckpt"
    target.parent.mkdir()
    link.symlink_to(target)
    torchaux.save_checkpoint({"w": torch.ones(2)}, link)
    assert not link.is_symlink() and not target.exists()


def test_save_checkpoint_replaces_a_link_to_a_directory(tmp_path: Path) -> None:
    """A link to a directory is replaced, not refused as 'a directory' nor written into."""
    other = tmp_path / "dir"
    other.mkdir()
    link = tmp_path / "m.ckpt"
    link.symlink_to(other)
    torchaux.save_checkpoint({"w": torch.ones(2)}, link)
    assert link.is_file() and not link.is_symlink() and os.listdir(other) == []


def test_save_async_follows_a_link_as_torch_save_does(tmp_path: Path) -> None:
    """The documented default of save_async: the file the link names is replaced."""
    real = tmp_path / "real.pt"
    real.write_bytes(b"old")
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    torchaux.save_async({"w": torch.ones(2)}, link).wait(60)
    assert link.is_symlink()
    assert torch.equal(torch.load(real, weights_only=True)["w"], torch.ones(2))


def test_save_async_refuses_a_link_with_follow_symlinks_false(tmp_path: Path) -> None:
    link, victim = _plant(tmp_path, "m.pt")
    with pytest.raises(ValueError, match="is a symlink and follow_symlinks=False"):
        torchaux.save_async({"w": torch.ones(2)}, link, follow_symlinks=False)
    assert link.is_symlink() and victim.read_bytes() == VICTIM
    plain = tmp_path / "shared" / "plain.pt"
    torchaux.save_async({"w": torch.ones(2)}, plain, follow_symlinks=False).wait(60)
    assert plain.is_file()
    with pytest.raises(TypeError, match="follow_symlinks must be a bool"):
        torchaux.save_async({"w": torch.ones(2)}, plain, follow_symlinks="no")  # type: ignore[arg-type]


def test_commit_replaces_a_link_planted_after_the_call(tmp_path: Path) -> None:
    """Between the call and the rename a link may appear: the rename replaces it."""
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    victim.chmod(0o644)
    target = tmp_path / "m.pt"
    with commit.atomic_write(str(target)) as f:
        target.symlink_to(victim)  # planted while the temp file is being written
        f.write(b"new")
    assert not target.is_symlink() and target.read_bytes() == b"new"
    assert victim.read_bytes() == VICTIM
    # The new file did not take the link destination's permission bits either.
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_temp_file_is_never_opened_through_a_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A link at the (predicted) temp name fails the save; its destination is not created."""
    target = tmp_path / "m.ckpt"
    monkeypatch.setattr(commit.secrets, "token_hex", lambda n: "deadbeef")
    planted = tmp_path / "created-by-us"
    Path(commit.temp_path_for(str(target))).symlink_to(planted)
    with pytest.raises(FileExistsError):
        torchaux.save_checkpoint({"w": torch.ones(2)}, target)
    assert not planted.exists() and not target.exists()


@pytest.mark.multiprocess
def test_process_saver_replaces_the_link(tmp_path: Path) -> None:
    from torchaux.checkpoint.engine.process_saver import ProcessSaver

    link, victim = _plant(tmp_path)
    saver = ProcessSaver()
    try:
        torchaux.save_checkpoint(
            {"w": torch.ones(2)}, link, async_save="process", enc_key=bytes(32), saver=saver
        ).wait(60)
    finally:
        saver.close()
    assert not link.is_symlink() and victim.read_bytes() == VICTIM
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
