"""``torchaux inspect``: envelope without a key, format, CRC presence and the entry table."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch

import torchaux
from torchaux.checkpoint.save import ENC_MODES
from torchaux.cli.main import main

pytest.importorskip("cryptography")

STATE = {"w": torch.ones(2, 3), "idx": torch.arange(5, dtype=torch.int16)}
VALUES = {"epoch": 3, "tag": "run-1"}
KEYS = {"AES-GCM": bytes(range(32)), "AES-CBC": bytes(range(24)), "SM4-CBC": bytes(range(16))}


def _save(tmp_path: Path, fmt: str = "ckpt", *, crc: bool = True, mode: str | None = None) -> str:
    path = str(tmp_path / f"m.{fmt}")
    key = KEYS[mode] if mode else None
    torchaux.save_checkpoint(
        STATE, path, append_dict=VALUES, crc_check=crc, format=fmt, enc_key=key,
        enc_mode=mode or "AES-GCM",
    )
    return path


def _key_file(tmp_path: Path, mode: str) -> str:
    path = tmp_path / "key.hex"
    path.write_text(KEYS[mode].hex() + "\n")
    path.chmod(0o600)
    return str(path)


def _report(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plain_ckpt_text_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The text report names the format, the CRC and one row per entry with dtype/shape/bytes."""
    path = _save(tmp_path)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "ckpt (torch.save zip)" in out and "encryption  none" in out
    assert "present (.torchaux/crc32 member" in out
    assert "2 tensors (34 B), 2 values" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[6:]}
    assert rows["w"][:2] == ["w", "float32"] and rows["w"][-1] == "24"
    assert rows["idx"][1:] == ["int16", "[5]", "10"]
    assert rows["epoch"][1:] == ["int", "-", "-", "3"]


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("crc", [True, False])
def test_json_report_lists_entries_and_crc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, crc: bool
) -> None:
    """--json gives format, CRC presence, every entry and totals for both formats."""
    report = _report(capsys, _save(tmp_path, fmt, crc=crc))
    assert report["format"] == fmt and report["encrypted"] is False
    assert report["crc"]["present"] is crc
    entries = {e["name"]: e for e in report["entries"]}
    assert entries["w"] == {"name": "w", "kind": "tensor", "dtype": "float32", "shape": [2, 3],
                            "bytes": 24}
    assert entries["idx"]["dtype"] == "int16" and entries["idx"]["bytes"] == 10
    assert entries["tag"]["value"] == "run-1" and entries["epoch"]["value"] == 3
    assert report["totals"] == {"tensors": 2, "values": 2, "tensor_bytes": 34}


def test_text_report_says_when_no_crc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file saved without crc_check reports 'crc none'."""
    assert main(["inspect", _save(tmp_path, "safetensors", crc=False)]) == 0
    assert "crc         none" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ENC_MODES)
def test_encrypted_without_key_shows_envelope_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """Without a key, inspect exits 0 with mode, key bits and chunk size, and no table."""
    path = _save(tmp_path, mode=mode)
    report = _report(capsys, path)
    assert report["encryption"]["mode"] == mode
    assert report["encryption"]["key_bits"] == 8 * len(KEYS[mode])
    assert report["encryption"]["chunk_size"] > 0
    assert report["entries"] is None and report["format"] is None
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert f"encryption  {mode}, {8 * len(KEYS[mode])}-bit key" in out and "--dec-key-file" in out


@pytest.mark.parametrize("mode", ENC_MODES)
@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_encrypted_with_key_lists_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str, fmt: str
) -> None:
    """With its key, an encrypted file of either format shows envelope and table."""
    path = _save(tmp_path, fmt, mode=mode)
    report = _report(capsys, path, "--dec-key-file", _key_file(tmp_path, mode))
    assert report["encryption"]["mode"] == mode and report["format"] == fmt
    assert report["crc"]["present"] is True
    assert sorted(e["name"] for e in report["entries"]) == ["epoch", "idx", "tag", "w"]


def test_wrong_key_is_one_line_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong key makes inspect exit 1 with one line on stderr and no traceback."""
    path = _save(tmp_path, mode="AES-GCM")
    key_file = tmp_path / "wrong.bin"
    key_file.write_bytes(bytes(32))
    key_file.chmod(0o600)
    assert main(["inspect", path, "--dec-key-file", str(key_file)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("torchaux inspect: error: wrong key") and err.count("\n") == 1


@pytest.mark.parametrize(
    "content", [b"", b"not a checkpoint at all", b"PK\x03\x04" + bytes(40)],
    ids=["empty", "garbage", "broken-zip"],
)
def test_unreadable_file_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    """Empty, unknown and damaged files exit 1 with a one-line reason."""
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("torchaux inspect: error: ") and err.count("\n") == 1


def test_missing_file_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A path that does not exist exits 1 with a one-line message."""
    assert main(["inspect", str(tmp_path / "nope.ckpt")]) == 1
    assert "No such file" in capsys.readouterr().err


def test_pickle_beyond_weights_only_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A torch.save file needing more than weights_only unpickling exits 1, nothing executed."""
    path = tmp_path / "obj.pt"
    torch.save({"when": datetime.date(2020, 1, 1)}, path)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert "weights-only" in err and err.count("\n") == 1


def test_progress_bar_renders_when_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--progress draws the bar on stderr, ending at 100% with a rate."""
    path = _save(tmp_path, mode="AES-CBC")
    assert main(["inspect", path, "--dec-key-file", _key_file(tmp_path, "AES-CBC"),
                 "--progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("\rm.ckpt: ") and "100%" in err and err.endswith("B/s]\n")


def test_progress_bar_silent_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --progress, a non-terminal stderr gets no bar; --no-progress never draws."""
    path = _save(tmp_path)
    assert main(["inspect", path]) == 0
    assert main(["inspect", path, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


# -- output hygiene (security review, issue #16 item 5) ------------------------

_EVIL = "w\ncrc         present (.torchaux/crc32 member)\x1b[2K\x1b[1A\x1b[2K\u202e\x07"


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_names_and_values_are_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    """t_inj.py: no raw control character from the file reaches the terminal."""
    path = tmp_path / f"inj.{fmt}"
    torchaux.save_checkpoint(
        {_EVIL: torch.ones(2), "b": torch.zeros(1)}, path, format=fmt,
        append_dict={"note": "x\x1b]0;title\x07y", "v" + _EVIL: 1},
    )
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\u202e")
    assert sum(line.startswith("crc ") for line in out.splitlines()) == 1
    assert "w\\ncrc" in out and "\\x1b[2K" in out and "\\u202e" in out
    assert main(["inspect", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert _EVIL in {e["name"] for e in report["entries"]}  # JSON keeps the exact name


def test_file_name_is_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m\x1b[31m.ckpt"
    torchaux.save_checkpoint({"w": torch.ones(2)}, path)
    assert main(["inspect", str(path)]) == 0
    assert "\x1b" not in capsys.readouterr().out


def test_identity_is_shown_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "id.ckpt"
    torchaux.save_checkpoint({"w": torch.ones(2)}, path, enc_key=bytes(16), enc_aad="run\x1b/7")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "identity    run\\x1b/7 (authenticated" in out and "\x1b" not in out
    assert "format version 2" in out


# -- distributed checkpoint directories (torchaux inspect DIR) ------------------------------

import sharded_workers  # noqa: E402 - tests/cli helper: 2 spawned gloo ranks save once


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sharded_workers.checkpoints(tmp_path_factory)


@pytest.mark.multiprocess
def test_dir_json_report_shows_ranks_shapes_and_shard_layout(
    sharded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Global shapes equal the full tensors; each tensor's shards tile it, one per rank."""
    r = _report(capsys, str(sharded / "plain"))
    expected = torch.load(sharded / "expected.pt", weights_only=True)
    assert (r["kind"], r["writer"], r["ranks"]) == ("distributed", "torchaux", [0, 1])
    assert r["checksum"] == {"present": True, "algorithm": "xxh3-64"} and r["encryption"] is None
    assert [(f["rank"], f["present"], f["size"] == f["expected_size"]) for f in r["files"]] == [
        (0, True, True), (1, True, True)]
    tensors = {t["name"]: t for t in r["tensors"]}
    assert tensors["model.0.weight"]["shape"] == list(expected["model"]["0.weight"].shape)
    rows = tensors["rows"]  # 9 rows over 2 ranks: uneven shards
    assert (rows["shape"], rows["bytes"]) == ([9, 4], 9 * 4 * 4)
    assert [(s["rank"], s["box"]) for s in rows["shards"]] == [
        (0, [[0, 5], [0, 4]]), (1, [[5, 9], [0, 4]])]
    assert [s["box"] for s in tensors["tp"]["shards"]] == [[[0, 5], [0, 9]], [[0, 5], [9, 17]]]
    for t in r["tensors"]:  # the shards of every tensor tile its global shape
        volume = sum(torch.Size(s["sizes"]).numel() for s in t["shards"])
        assert volume == torch.Size(t["shape"]).numel(), t["name"]
        assert all(s["checksum"] for s in t["shards"])
    values = {v["name"]: v for v in r["values"]}
    assert values["step"]["value"] == 3 and values["meta.name"]["value"] == "mlp"


@pytest.mark.multiprocess
def test_dir_text_report(sharded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(sharded / "plain")]) == 0
    out = capsys.readouterr().out
    assert "ranks       2 (0, 1), 2 data files" in out
    assert "checksums   xxh3-64 per chunk" in out and "encryption  none" in out
    assert "[0:5, 0:4]" in out and "[5:9, 0:4]" in out  # the shard boxes of "rows"


@pytest.mark.multiprocess
def test_encrypted_dir_shows_mode_and_envelope_without_key(
    sharded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = _report(capsys, str(sharded / "encrypted"))
    assert r["encryption"]["mode"] == "AES-GCM"
    assert r["encryption"]["envelope"]["key_bits"] == 8 * len(sharded_workers.KEY)
    assert all("value" not in v for v in r["values"])  # ciphertext is not shown
    assert main(["inspect", str(sharded / "encrypted")]) == 0
    assert "AES-GCM per chunk, 256-bit key" in capsys.readouterr().out


@pytest.mark.multiprocess
def test_stock_dcp_dir_has_no_checksums(sharded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _report(capsys, str(sharded / "stock"))
    assert (r["writer"], r["checksum"]["present"], r["ranks"]) == ("dcp", False, [0, 1])
    plain = _report(capsys, str(sharded / "plain"))
    assert [t["shape"] for t in r["tensors"]] == [t["shape"] for t in plain["tensors"]]


@pytest.mark.multiprocess
def test_dir_with_missing_rank_file_is_shown_missing(
    sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(sharded / "plain", d)
    sharded_workers.data_files(d)[1].unlink()
    r = _report(capsys, str(d))
    assert [(f["rank"], f["present"]) for f in r["files"]] == [(0, True), (1, False)]


def test_dir_without_metadata_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "__0_0.distcp").write_bytes(b"x")
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("torchaux inspect: error: ") and "no committed" in err
