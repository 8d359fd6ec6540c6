"""A real full file system: a small tmpfs and a loop-mounted ext4 image (so direct I/O runs).

Each save path writes a checkpoint that does not fit: the ENOSPC reaches the
caller, the previous checkpoint loads unchanged, no temp file remains, and
once space is freed the next save on the same path (and saver) succeeds.
These tests mount file systems, so they need root; they skip otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fsrecord import errno_of

import torchaux
from torchaux.checkpoint.storage.commit import TEMP_MARKER

KEY = bytes(range(32))
_MIB = 1 << 20


def _mount(kind: str, where: Path, image: Path) -> None:
    if kind == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)]
    else:
        subprocess.run(["truncate", "-s", "12M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        cmd = ["mount", "-o", "loop", str(image), str(where)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a {kind} here: {proc.stderr.strip()}")


@pytest.fixture(params=["tmpfs", "ext4"])
def small_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A few MiB file system of the given kind, mounted for the test and unmounted after."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root and mount(8)")
    if request.param == "ext4" and shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    where = tmp_path / "mnt"
    where.mkdir()
    _mount(request.param, where, tmp_path / "fs.img")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(directory: Path, leave: int) -> Path:
    """Fill the file system until ``leave`` bytes are free; return the filler file."""
    filler = directory / "filler"
    free = shutil.disk_usage(directory).free
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(free - leave, 0))
            f.flush()
            os.fsync(f.fileno())
    return filler


#: save path -> (file name, save-and-wait, load).
PATHS: dict[str, tuple[str, Callable[[dict, str], None], Callable[[str], dict]]] = {
    "save_async": ("m.pt", lambda s, p: torchaux.save_async(s, p).wait(),
                   lambda p: torch.load(p, weights_only=True)),
    "save_checkpoint ckpt+CRC": ("m.ckpt", lambda s, p: torchaux.save_checkpoint(
        s, p, crc_check=True), lambda p: torchaux.load_checkpoint(p, crc_check=True)),
    "save_checkpoint safetensors AES-GCM": ("m.safetensors", lambda s, p: torchaux.save_checkpoint(
        s, p, format="safetensors", enc_key=KEY), lambda p: torchaux.load_checkpoint(p, dec_key=KEY)),
    "save_checkpoint thread": ("m.ckpt", lambda s, p: torchaux.save_checkpoint(
        s, p, async_save="thread").wait(), torchaux.load_checkpoint),
}


def _state(step: int, nbytes: int) -> dict:
    return {"w": torch.full((nbytes // 4,), float(step)), "step": torch.tensor(step)}


@pytest.mark.parametrize("which", sorted(PATHS))
def test_enospc_on_a_real_full_file_system(small_fs: Path, which: str) -> None:
    """The save that does not fit raises ENOSPC; the old file survives; freeing space heals."""
    name, save, load = PATHS[which]
    path = str(small_fs / name)
    save(_state(1, 256 << 10), path)
    old = Path(path).read_bytes()
    filler = _fill(small_fs, leave=512 << 10)
    with pytest.raises(OSError) as info:
        save(_state(2, 2 * _MIB), path)
    assert errno_of(info.value) in (errno.ENOSPC, errno.EDQUOT), repr(info.value)
    assert Path(path).read_bytes() == old
    assert int(load(path)["step"]) == 1
    assert [n for n in os.listdir(small_fs) if TEMP_MARKER in n] == []
    filler.unlink()
    save(_state(3, 2 * _MIB), path)
    assert int(load(path)["step"]) == 3


@pytest.mark.multiprocess
def test_enospc_reaches_the_process_saver(small_fs: Path) -> None:
    """The writer process's ENOSPC reaches handle.wait(); its temp file is gone; it keeps working."""
    path = str(small_fs / "p.ckpt")
    torchaux.save_checkpoint(_state(1, 256 << 10), path)
    old = Path(path).read_bytes()
    filler = _fill(small_fs, leave=512 << 10)
    handle = torchaux.save_checkpoint(_state(2, 2 * _MIB), path, async_save="process")
    with pytest.raises(OSError) as info:
        handle.wait(timeout=120)
    assert errno_of(info.value) in (errno.ENOSPC, errno.EDQUOT), repr(info.value)
    assert Path(path).read_bytes() == old
    assert [n for n in os.listdir(small_fs) if TEMP_MARKER in n] == []
    filler.unlink()
    torchaux.save_checkpoint(_state(3, 2 * _MIB), path, async_save="process").wait(timeout=120)
    assert int(torchaux.load_checkpoint(path)["step"]) == 3
