"""Key sources of the CLI: key files (raw, hex), environment variables, never argv."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import torchaux
from torchaux.cli.keys import (
    DEC_KEY_ENV,
    ENC_KEY_ENV,
    Key,
    KeySourceError,
    load_key,
    parse_key_bytes,
    read_key_env,
    read_key_file,
)
from torchaux.cli.main import build_parser, main

pytest.importorskip("cryptography")

KEY = bytes(range(100, 132))  # 32 bytes, not valid hex text
HEX = KEY.hex()
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")


def _write_key(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


def _encrypted(tmp_path: Path, key: bytes = KEY) -> str:
    path = str(tmp_path / "enc.ckpt")
    torchaux.save_checkpoint({"w": torch.arange(6.0)}, path, enc_key=key, crc_check=True)
    return path


@pytest.mark.parametrize(
    "content",
    [HEX.encode(), HEX.encode() + b"\n", HEX.upper().encode() + b"\r\n"],
    ids=["bare", "newline", "upper-crlf"],
)
def test_hex_key_file_is_decoded(tmp_path: Path, content: bytes) -> None:
    """A key file of 64 hex digits (any case, optional newline) yields the 32 decoded bytes."""
    assert read_key_file(_write_key(tmp_path / "k", content)).secret == KEY


@pytest.mark.parametrize("n", [16, 24, 32])
def test_raw_key_file_is_used_byte_for_byte(tmp_path: Path, n: int) -> None:
    """A key file that is not hex text is the raw key, a trailing newline byte included."""
    raw = bytes(range(200, 200 + n - 1)) + b"\n"
    assert read_key_file(_write_key(tmp_path / "k", raw)).secret == raw


@pytest.mark.parametrize("hex_len", [32, 48, 64])
def test_hex_lengths_give_aes_key_sizes(hex_len: int) -> None:
    """32, 48 and 64 hex digits decode to 16-, 24- and 32-byte keys."""
    assert len(parse_key_bytes(b"a" * hex_len, "k")) == hex_len // 2


@pytest.mark.parametrize("content", [b"", b"\x01" * 15, b"\x01" * 33, b"0" * 63 + b"\n"])
def test_bad_key_file_content_is_refused_without_echo(tmp_path: Path, content: bytes) -> None:
    """A key file holding no valid key raises KeySourceError naming the file, not the content."""
    path = _write_key(tmp_path / "k", content)
    with pytest.raises(KeySourceError, match="expected 16, 24 or 32 raw bytes") as info:
        read_key_file(path)
    assert path in str(info.value)
    if content.strip():
        assert content.strip().decode("latin-1") not in str(info.value)


@posix_only
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_key_file_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    """A key file with any group/other permission bit is refused with the chmod fix."""
    path = _write_key(tmp_path / "k", HEX.encode(), mode)
    with pytest.raises(KeySourceError, match="chmod 600"):
        read_key_file(path)


def test_missing_key_file_is_a_key_source_error(tmp_path: Path) -> None:
    """A key file that does not exist raises KeySourceError naming the path."""
    with pytest.raises(KeySourceError, match="cannot read key file .*nope"):
        read_key_file(str(tmp_path / "nope"))


def test_key_typed_in_place_of_its_path_is_not_echoed() -> None:
    """A hex key passed where the key file's path belongs is refused without printing it."""
    with pytest.raises(KeySourceError, match="looks like a key") as info:
        read_key_file(HEX)
    assert HEX not in str(info.value)


def test_env_key_is_hex(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment variable holds the key as hex, whitespace around it ignored."""
    monkeypatch.setenv(DEC_KEY_ENV, f"  {HEX}\n")
    key = read_key_env(DEC_KEY_ENV)
    assert key is not None and key.secret == KEY and key.source == f"env {DEC_KEY_ENV}"


@pytest.mark.parametrize("value", ["zz" * 16, "ab" * 15, "abc"])
def test_bad_env_key_is_refused_without_echo(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """A malformed environment key raises KeySourceError naming the variable, not the value."""
    monkeypatch.setenv(ENC_KEY_ENV, value)
    with pytest.raises(KeySourceError, match=ENC_KEY_ENV) as info:
        read_key_env(ENC_KEY_ENV)
    assert value not in str(info.value)


def test_unset_or_empty_env_gives_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unset or empty variable means no key."""
    monkeypatch.delenv(DEC_KEY_ENV, raising=False)
    assert read_key_env(DEC_KEY_ENV) is None
    monkeypatch.setenv(DEC_KEY_ENV, "")
    assert load_key(None, DEC_KEY_ENV) is None


def test_key_file_takes_precedence_over_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit key file wins over the environment variable."""
    monkeypatch.setenv(DEC_KEY_ENV, "00" * 32)
    key = load_key(_write_key(tmp_path / "k", HEX.encode()), DEC_KEY_ENV)
    assert key is not None and key.secret == KEY


def test_key_repr_hides_the_secret() -> None:
    """repr/str of a Key show its size and source, never its bytes."""
    text = repr(Key(KEY, "key file k")) + str(Key(KEY, "key file k"))
    assert "256-bit" in text and HEX not in text and repr(KEY) not in text


@pytest.mark.parametrize("form", ["raw", "hex"])
def test_cli_reads_key_file_raw_and_hex(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    """verify accepts the decryption key as a raw or a hex key file."""
    path = _encrypted(tmp_path)
    key_file = _write_key(tmp_path / "k", KEY if form == "raw" else HEX.encode() + b"\n")
    assert main(["verify", path, "--dec-key-file", key_file]) == 0
    assert capsys.readouterr().out.startswith("OK ")


def test_cli_reads_key_from_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no key file, the decryption key comes from TORCHAUX_DEC_KEY."""
    path = _encrypted(tmp_path)
    monkeypatch.setenv(DEC_KEY_ENV, HEX)
    assert main(["inspect", path]) == 0
    assert "float32" in capsys.readouterr().out


@posix_only
def test_cli_refuses_unprotected_key_file_with_usage_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A group-readable key file is a usage error: exit 2 and a one-line message."""
    path = _encrypted(tmp_path)
    key_file = _write_key(tmp_path / "k", HEX.encode(), 0o644)
    assert main(["verify", path, "--dec-key-file", key_file]) == 2
    err = capsys.readouterr().err
    assert "chmod 600" in err and err.count("\n") == 1 and HEX not in err


@pytest.mark.parametrize("command", ["inspect", "verify", "convert"])
@pytest.mark.parametrize("option", ["--dec-key", "--enc-key", "--key", "--dec-key={}", "--dec-k"])
def test_key_on_command_line_is_impossible(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, option: str
) -> None:
    """No option takes a key (abbreviations neither), and the refusal does not echo it."""
    args = [command, str(tmp_path / "a.ckpt")]
    if command == "convert":
        args += [str(tmp_path / "b.ckpt"), "--format", "ckpt"]
    args += [option.format(HEX)] if "=" in option else [option, HEX]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert HEX not in captured.err + captured.out
    assert "unrecognized arguments" in captured.err


def test_only_key_file_options_mention_keys() -> None:
    """Every option of every checkpoint command that mentions a key takes a file path."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    options = [
        opt
        for name in ("inspect", "verify", "convert")
        for action in sub.choices[name]._actions  # type: ignore[union-attr]
        for opt in action.option_strings
        if "key" in opt
    ]
    assert options and all(opt.endswith("-key-file") for opt in options)


def test_key_material_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """inspect, verify and convert (progress on) print neither the keys nor their hex."""
    path = _encrypted(tmp_path)
    key_file = _write_key(tmp_path / "k", KEY)
    new_key = bytes(range(1, 17))
    monkeypatch.setenv(ENC_KEY_ENV, new_key.hex())
    assert main(["inspect", path, "--dec-key-file", key_file, "--json", "--progress"]) == 0
    assert main(["verify", path, "--dec-key-file", key_file, "--progress"]) == 0
    dst = str(tmp_path / "out.safetensors")
    argv = ["convert", path, dst, "--format", "safetensors", "--dec-key-file", key_file,
            "--enc-mode", "SM4-CBC", "--progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    for secret in (KEY, new_key):
        assert secret.hex() not in text.lower() and repr(secret) not in text
        assert secret.decode("latin-1") not in text


# -- key sources: owner and directory (security review, issue #16 item 4) ------


def _foreign_owner(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``path`` look owned by someone else: chown as root, else pretend to be another uid."""
    if os.geteuid() == 0:
        os.chown(path, 12345, -1)
    else:
        me = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: me + 1)


@posix_only
def test_key_file_owned_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    if os.geteuid() != 0:
        pytest.skip("needs root to give the key file, and not its directory, another owner")
    path = _write_key(private / "k.hex", HEX.encode())
    _foreign_owner(Path(path), monkeypatch)
    with pytest.raises(KeySourceError, match="owned by uid 12345, not by you") as info:
        read_key_file(path)
    assert HEX not in str(info.value)


@posix_only
def test_key_file_owner_check_uses_the_effective_uid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Owned by neither the caller nor root: refused (simulated by changing the caller)."""
    path = _write_key(tmp_path / "k.hex", HEX.encode())
    owner = os.stat(path).st_uid
    if owner == 0:
        os.chown(path, 12345, -1)
        owner = 12345
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    monkeypatch.setattr("torchaux.cli.keys._check_directory", lambda p: None)
    with pytest.raises(KeySourceError, match=f"owned by uid {owner}, not by you"):
        read_key_file(path)


@posix_only
@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_key_in_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    path = _write_key(shared / "k.hex", HEX.encode())
    shared.chmod(mode)
    with pytest.raises(KeySourceError, match="which group or others can write") as info:
        read_key_file(path)
    assert HEX not in str(info.value)


@posix_only
def test_key_in_a_sticky_directory_is_accepted(tmp_path: Path) -> None:
    """Like /tmp: others can write the directory but cannot replace our file."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    path = _write_key(sticky / "k.hex", HEX.encode())
    sticky.chmod(0o1777)
    assert read_key_file(path).secret == KEY


@posix_only
def test_link_into_an_unsafe_directory_is_refused(tmp_path: Path) -> None:
    """The directory the key really lives in is checked, not only the link's."""
    shared = tmp_path / "shared"
    shared.mkdir()
    real = _write_key(shared / "k.hex", HEX.encode())
    shared.chmod(0o777)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "k.hex").symlink_to(real)
    with pytest.raises(KeySourceError, match="others can write"):
        read_key_file(str(private / "k.hex"))


@posix_only
def test_cli_refuses_key_in_writable_directory_with_usage_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enc = _encrypted(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    key = _write_key(shared / "k.hex", HEX.encode())
    shared.chmod(0o777)
    assert main(["verify", enc, "--dec-key-file", key]) == 2
    err = capsys.readouterr().err
    assert "others can write" in err and HEX not in err


def test_redact_hides_key_like_hex_runs() -> None:
    from torchaux.cli.keys import redact

    assert redact(f"bad '{HEX}' and '{HEX[:32]}'") == "bad '<64 hex digits hidden>' and '<32 hex digits hidden>'"
    assert redact("step 1234 crc 0a683a29") == "step 1234 crc 0a683a29"


def test_hex_key_as_enc_mode_is_not_echoed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's 'invalid choice' would print the value: a key typed there is hidden."""
    src = str(tmp_path / "a.ckpt")
    torchaux.save_checkpoint({"w": torch.ones(2)}, src)
    with pytest.raises(SystemExit) as info:
        main(["convert", src, str(tmp_path / "b.ckpt"), "--format", "ckpt", "--enc-mode", HEX])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and HEX not in err and HEX.upper() not in err


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_hex_key_as_file_is_not_echoed(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, HEX]) == 1
    err = capsys.readouterr().err
    assert "No such file" in err and HEX not in err


def test_hex_key_as_convert_paths_is_not_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["convert", HEX, str(tmp_path / "out.ckpt"), "--format", "ckpt"]) == 1
    err = capsys.readouterr().err
    assert err and HEX not in err
