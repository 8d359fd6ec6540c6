"""crc_copies: staging copies that compute the zip records' CRC-32 on the way, and the files they give."""

from __future__ import annotations

import threading
import zipfile
import zlib

import pytest
import torch

import torchaux
from torchaux import _knobs
from torchaux.checkpoint.engine.staging import crc_copies
from torchaux.checkpoint.formats.torch_save import container

pytestmark = pytest.mark.skipif(not crc_copies.AVAILABLE, reason="fused CRC copies need zlib-ng")


def _bytes(storage: torch.UntypedStorage) -> bytes:
    return bytes(container.storage_view(storage))


def _storage(nbytes: int, seed: int) -> torch.UntypedStorage:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).untyped_storage()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_copies_and_crcs_equal_zlibs_for_every_split(threads: int) -> None:
    # Sizes around the 256 KiB chunk and the 8 MiB piece boundaries, so the
    # piece split and crc32_combine run with tails of every kind.
    sizes = [1 << 16, (1 << 16) + 1, (256 << 10) - 1, 8 << 20, (8 << 20) + 4097, (17 << 20) + 3]
    sources = [_storage(n, i) for i, n in enumerate(sizes)]
    staged = [torch.UntypedStorage(n) for n in sizes]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        crcs = crc_copies.copy_host_with_crc(list(zip(staged, sources)))
    finally:
        torch.set_num_threads(before)
    assert crcs == [zlib.crc32(_bytes(s)) for s in sources]
    assert all(_bytes(d) == _bytes(s) for d, s in zip(staged, sources))


def test_a_failing_piece_reaches_the_caller_after_every_helper_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    real = crc_copies._copy_piece
    active = [0]
    lock = threading.Lock()
    caller = threading.get_ident()

    def piece(dst: int, src: int, nbytes: int) -> int:
        with lock:
            active[0] += 1
        try:
            if threading.get_ident() == caller:
                raise OSError("injected copy failure")
            return real(dst, src, nbytes)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(crc_copies, "_copy_piece", piece)
    sources = [_storage(24 << 20, 1)]
    staged = [torch.UntypedStorage(24 << 20)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(OSError, match="injected"):
            crc_copies.copy_host_with_crc(list(zip(staged, sources)))
    finally:
        torch.set_num_threads(before)
    assert active[0] == 0  # no helper still writing into a buffer the caller gives back


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "big": torch.randn(3 << 20, generator=gen),  # 12 MiB: two pieces
        "mid": torch.randn(1 << 15, generator=gen),  # 128 KiB
        "small": torch.randn(10, generator=gen),  # below MIN_BYTES: the writer's CRC
    }


def test_save_async_writes_the_staged_crcs_and_the_writer_skips_them(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    computed: list[int] = []
    real = container.crc32

    def counting(data, value=0):  # type: ignore[no-untyped-def]
        computed.append(len(memoryview(data)))
        return real(data, value)

    monkeypatch.setattr(container, "crc32", counting)
    state = _state()
    path = tmp_path / "a.pt"
    torchaux.save_async(state, path).wait()
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every record's CRC matches its bytes
    assert max(computed) < crc_copies.MIN_BYTES  # large records' CRCs came from staging
    loaded = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_a_wrong_staged_crc_would_be_caught_by_zip_readers(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Negative control: the file really carries the staged value.
    real = crc_copies.copy_host_with_crc
    monkeypatch.setattr(crc_copies, "copy_host_with_crc", lambda pairs: [c ^ 1 for c in real(pairs)])
    path = tmp_path / "bad.pt"
    torchaux.save_async(_state(), path).wait()
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is not None


def test_knob_off_leaves_every_crc_to_the_writer(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[int] = []
    monkeypatch.setattr(crc_copies, "copy_host_with_crc", lambda pairs: called.append(1) or [])
    path = tmp_path / "c.pt"
    with _knobs.override(staging_crc=0):
        torchaux.save_async(_state(), path).wait()
    assert not called
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None


def test_save_checkpoint_with_crc_check_and_encryption_verifies(tmp_path) -> None:
    state = _state()
    path = str(tmp_path / "s.ckpt")
    key = b"k" * 32
    torchaux.save_checkpoint(state, path, crc_check=True, enc_key=key)
    loaded = torchaux.load_checkpoint(path, crc_check=True, dec_key=key)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_model_mode_deferred_copies_carry_their_crcs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    computed: list[int] = []
    real = container.crc32
    monkeypatch.setattr(container, "crc32", lambda d, v=0: computed.append(len(memoryview(d))) or real(d, v))
    model = torch.nn.Linear(1024, 512)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(2, 1024)).sum().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "m.pt"
    handle = torchaux.save_async(model.state_dict(), path, model=model)
    opt.step()  # the fence copies what the writer has not copied yet
    handle.wait()
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
    assert max(computed) < crc_copies.MIN_BYTES
    loaded = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
