"""MindSpore's checkpoint tests, ported (mindspore-spec.md §10.1 items 1-9).

Each test names the upstream behaviour it mirrors.  Where torchaux deliberately
differs from MindSpore (TypeError for type errors, the file name used as given,
CRC combined with encryption, unknown keyword arguments rejected, state_dict
with buffers, append_dict scalars returned as Python values), the test checks
torchaux's behaviour and its docstring says so.
"""

from __future__ import annotations

import json
import os
import secrets
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from secure_helpers import (
    ENCRYPTION_IDS,
    ENCRYPTIONS,
    FORMATS,
    WAIT_S,
    assert_entries,
    close_process_saver,
    expected_entries,
)
from torch import nn

import torchaux
from torchaux import AsyncSaver, DecryptionError, IntegrityError
from torchaux.checkpoint.engine.process_saver import ProcessSaver

#: Every name in ConvNet's state_dict, in order.
NET_KEYS = [
    "conv1.weight",
    "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "conv2.weight",
    "fc1.weight", "fc1.bias",
]


class ConvNet(nn.Module):
    """A small conv net in the shape of MindSpore's test nets (conv1, bn1, conv2, fc1)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.conv2 = nn.Conv2d(2, 2, 3, bias=False)
        self.fc1 = nn.Linear(8, 3)
        with torch.no_grad():
            self.bn1.running_mean.uniform_()
            self.bn1.num_batches_tracked.fill_(5)


def _path(tmp_path: Any, name: str = "net.ckpt") -> str:
    return os.path.join(os.path.realpath(tmp_path), name)


def _saved(obj: Any, tmp_path: Any, fmt: str = "ckpt", **kwargs: Any) -> str:
    path = _path(tmp_path, f"net.{fmt}")
    torchaux.save_checkpoint(obj, path, format=fmt, **kwargs)
    return path


@pytest.fixture(scope="module")
def process_saver() -> Iterator[ProcessSaver]:
    """One writer process for the module."""
    saver = ProcessSaver(name="torchaux-test-process-writer")
    yield saver
    close_process_saver(saver)


# -- 1. round trip for each save_obj kind ---------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_round_trip_includes_buffers(tmp_path: Any, fmt: str) -> None:
    """A module saves its whole state_dict, buffers included (differs: MindSpore saves params)."""
    net = ConvNet()
    loaded = torchaux.load_checkpoint(_saved(net, tmp_path, fmt))
    assert sorted(loaded) == sorted(NET_KEYS)
    assert_entries(loaded, expected_entries(net.state_dict()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_list_of_bare_tensors_named_by_position(tmp_path: Any, fmt: str) -> None:
    """A list of parameters is saved under "0", "1", ... (differs: torch params have no name)."""
    params = list(ConvNet().parameters())
    loaded = torchaux.load_checkpoint(_saved(params, tmp_path, fmt))
    assert_entries(loaded, {str(i): p.detach().clone() for i, p in enumerate(params)})


@pytest.mark.parametrize("fmt", FORMATS)
def test_list_of_named_pairs_and_name_data_dicts(tmp_path: Any, fmt: str) -> None:
    """(name, tensor) pairs and {"name", "data"} dicts round-trip under their names."""
    net = ConvNet()
    pairs = list(net.named_parameters())
    dicts = [{"name": n, "data": p} for n, p in pairs]
    want = expected_entries(dict(pairs))
    assert_entries(torchaux.load_checkpoint(_saved(pairs, tmp_path, fmt)), want)
    assert_entries(torchaux.load_checkpoint(_saved(dicts, tmp_path, fmt)), want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dict_from_load_round_trips(tmp_path: Any, fmt: str) -> None:
    """What load_checkpoint returns (tensors and append values) saves and loads unchanged."""
    first = torchaux.load_checkpoint(
        _saved(ConvNet(), tmp_path, fmt, append_dict={"epoch": 3, "tag": "a"})
    )
    again_path = _path(tmp_path, "again")
    torchaux.save_checkpoint(first, again_path, format=fmt)
    assert_entries(torchaux.load_checkpoint(again_path), expected_entries(first))


@pytest.mark.parametrize("fmt", FORMATS)
def test_choice_func_on_save(tmp_path: Any, fmt: str) -> None:
    """choice_func keeps conv2.weight, drops conv1.weight, fc1.bias (test_ops_save_checkpoint)."""
    path = _saved(ConvNet(), tmp_path, fmt, append_dict={"lr": 0.1},
                  choice_func=lambda x: x.startswith("conv") and not x.startswith("conv1"))
    loaded = torchaux.load_checkpoint(path)
    assert "conv2.weight" in loaded
    assert "conv1.weight" not in loaded and "fc1.bias" not in loaded
    assert sorted(loaded) == ["conv2.weight", "lr"], "append_dict is never filtered"


# -- 2. append_dict ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_append_dict_nine_entries(tmp_path: Any, fmt: str) -> None:
    """3 tensors + 6 appended entries load as 9; scalars come back as Python values (differs)."""
    tensors = [("w1", torch.ones(2, 2)), ("w2", torch.zeros(3)), ("w3", torch.arange(4.0))]
    append = {
        "lr": 0.01, "epoch": 20, "train": True, "par_string": "string_test",
        "par_param": nn.Parameter(torch.tensor(1.0)),
        "par_tensor": torch.tensor([[1, 2], [2, 3]]),
    }
    loaded = torchaux.load_checkpoint(_saved(tensors, tmp_path, fmt, append_dict=append))
    assert len(loaded) == 9
    assert loaded["par_string"] == "string_test" and type(loaded["par_string"]) is str
    assert (loaded["par_param"].dtype, loaded["par_param"].shape) == (torch.float32, ())
    assert (loaded["par_tensor"].dtype, loaded["par_tensor"].shape) == (torch.int64, (2, 2))
    assert [(loaded[k], type(loaded[k])) for k in ("lr", "epoch", "train")] == [
        (0.01, float), (20, int), (True, bool)
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_append_dict_overwrites_same_name(tmp_path: Any, fmt: str) -> None:
    """An append_dict entry named like a saved tensor replaces it."""
    loaded = torchaux.load_checkpoint(
        _saved({"w": torch.ones(2)}, tmp_path, fmt, append_dict={"w": torch.zeros(3)})
    )
    assert_entries(loaded, {"w": torch.zeros(3)})


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_list_with_append_dict(tmp_path: Any, fmt: str) -> None:
    """An empty list plus append_dict saves just the appended entries."""
    assert torchaux.load_checkpoint(_saved([], tmp_path, fmt, append_dict={"lr": 0.01})) == {
        "lr": 0.01
    }


# -- 3. load errors ------------------------------------------------------------------


def test_load_non_path_is_type_error() -> None:
    """load_checkpoint(1) raises TypeError."""
    with pytest.raises(TypeError, match="ckpt_file_name"):
        torchaux.load_checkpoint(1)  # type: ignore[arg-type]


def test_load_empty_file_is_value_error(tmp_path: Any) -> None:
    """An empty file raises ValueError."""
    path = _path(tmp_path, "empty.ckpt")
    open(path, "wb").close()
    with pytest.raises(ValueError, match="empty"):
        torchaux.load_checkpoint(path)


def test_load_missing_file_is_value_error(tmp_path: Any) -> None:
    """A missing file raises ValueError."""
    with pytest.raises(ValueError, match="does not exist"):
        torchaux.load_checkpoint(_path(tmp_path, "missing.ckpt"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_choice_func_rejecting_everything_is_value_error(tmp_path: Any, fmt: str) -> None:
    """A choice_func that rejects every name raises ValueError."""
    path = _saved(ConvNet(), tmp_path, fmt)
    with pytest.raises(ValueError, match="no entries left"):
        torchaux.load_checkpoint(path, choice_func=lambda name: False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_choice_func_raising_is_value_error(tmp_path: Any, fmt: str) -> None:
    """A choice_func that raises (x.startswith(123)) surfaces as ValueError, chained."""
    path = _saved(ConvNet(), tmp_path, fmt)
    with pytest.raises(ValueError, match="choice_func") as info:
        torchaux.load_checkpoint(path, choice_func=lambda x: x.startswith(123))
    assert isinstance(info.value.__cause__, TypeError)


def test_load_with_format_mismatch_is_value_error(tmp_path: Any) -> None:
    """format= naming another format than the content raises ValueError."""
    path = _saved(ConvNet(), tmp_path, "ckpt")
    with pytest.raises(ValueError, match="format"):
        torchaux.load_checkpoint(path, format="safetensors")


# -- 4. prefix and choice_func counts --------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("kwargs", "count"),
    [
        ({"specify_prefix": "conv"}, 2),
        ({"specify_prefix": ["conv1", "fc1"]}, 3),
        ({"specify_prefix": ("bn1",)}, 5),
        ({"filter_prefix": "bn1"}, 4),
        ({"filter_prefix": ("bn1.running", "fc1")}, 5),
        ({"specify_prefix": "bn1", "filter_prefix": "bn1.running"}, 3),
        ({"choice_func": lambda n: n.endswith("weight")}, 4),
        ({"choice_func": lambda n: n.startswith("conv") and not n.startswith("conv1")}, 1),
        ({"specify_prefix": "conv", "choice_func": lambda n: False}, 2),
        ({"filter_prefix": "conv", "choice_func": lambda n: False}, 7),
    ],
    ids=["spec-str", "spec-list", "spec-tuple", "filter-str", "filter-tuple", "spec+filter",
         "choice", "choice-conv2", "spec-overrides-choice", "filter-overrides-choice"],
)
def test_prefix_and_choice_func_counts(
    tmp_path: Any, fmt: str, kwargs: dict[str, Any], count: int
) -> None:
    """Filters keep exactly the expected number of entries; a prefix argument overrides choice_func.

    Differs from MindSpore for safetensors, where upstream ignores the prefixes.
    """
    loaded = torchaux.load_checkpoint(_saved(ConvNet(), tmp_path, fmt), **kwargs)
    assert len(loaded) == count, sorted(loaded)


@pytest.mark.parametrize("arg", ["specify_prefix", "filter_prefix"])
@pytest.mark.parametrize(
    ("value", "error"),
    [(1, TypeError), ([], ValueError), (["conv", 2], TypeError), ([""], ValueError),
     ("", ValueError)],
    ids=["int", "empty-list", "non-str-item", "empty-item", "empty-str"],
)
def test_bad_prefix_arguments(tmp_path: Any, arg: str, value: object, error: type) -> None:
    """Prefix arguments: wrong type TypeError, empty or empty entries ValueError."""
    path = _saved(ConvNet(), tmp_path)
    with pytest.raises(error, match=arg):
        torchaux.load_checkpoint(path, **{arg: value})


def test_non_callable_choice_func_on_load_is_type_error(tmp_path: Any) -> None:
    """A non-callable choice_func raises TypeError before the file is read."""
    with pytest.raises(TypeError, match="choice_func"):
        torchaux.load_checkpoint(
            _path(tmp_path, "missing"), choice_func="conv"  # type: ignore[arg-type]
        )


# -- 5. load_param_into_net --------------------------------------------------------------


@pytest.mark.parametrize(
    ("net", "params"),
    [("net", {}), (ConvNet(), [("fc1.bias", torch.zeros(3))]), (ConvNet(), None)],
    ids=["str-net", "list-dict", "none-dict"],
)
def test_load_param_bad_net_or_dict_is_type_error(net: Any, params: Any) -> None:
    """A net that is no nn.Module, or a parameter_dict that is no dict, raises TypeError."""
    with pytest.raises(TypeError):
        torchaux.load_param_into_net(net, params)


@pytest.mark.parametrize(
    "value", [None, [1.0, 2.0], object(), b"raw"], ids=["none", "list", "object", "bytes"]
)
def test_load_param_value_of_wrong_type_is_type_error(value: object) -> None:
    """A value that is no tensor/int/float/bool/str raises TypeError; the net is untouched."""
    net = ConvNet()
    before = expected_entries(net.state_dict())
    with pytest.raises(TypeError, match="fc1.bias"):
        torchaux.load_param_into_net(net, {"fc1.weight": torch.zeros(3, 8), "fc1.bias": value})
    assert_entries(net.state_dict(), before)


def test_load_param_scalar_value_is_reported_not_loaded() -> None:
    """A value of 1 is not loaded but listed in both lists (differs: MindSpore raises TypeError).

    torchaux accepts int/float/bool/str values so that load_checkpoint's result,
    append_dict entries included, can be passed as is.
    """
    net = ConvNet()
    param_not_load, ckpt_not_load = torchaux.load_param_into_net(net, {"fc1.bias": 1})
    assert "fc1.bias" in param_not_load and ckpt_not_load == ["fc1.bias"]


def test_load_param_int32_into_float32_is_runtime_error() -> None:
    """int32 values into a float32 parameter raise RuntimeError even when not strict."""
    with pytest.raises(RuntimeError, match="dtype"):
        torchaux.load_param_into_net(ConvNet(), {"fc1.bias": torch.ones(3, dtype=torch.int32)})


def test_load_param_float64_converts_unless_strict() -> None:
    """float64 into float32 converts with a warning; with strict_load it raises RuntimeError."""
    net = ConvNet()
    value = torch.full((3,), 0.5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="converting"):
        torchaux.load_param_into_net(net, {"fc1.bias": value})
    assert net.fc1.bias.dtype == torch.float32 and torch.equal(net.fc1.bias, value.float())
    with pytest.raises(RuntimeError, match="dtype"):
        torchaux.load_param_into_net(net, {"fc1.bias": value}, strict_load=True)


def test_load_param_shape_mismatch_is_runtime_error_and_loads_nothing() -> None:
    """A shape mismatch raises RuntimeError; entries checked before it are not applied either."""
    net = ConvNet()
    before = expected_entries(net.state_dict())
    with pytest.raises(RuntimeError, match="shape"):
        torchaux.load_param_into_net(
            net, {"conv1.weight": torch.zeros(2, 1, 3, 3), "fc1.bias": torch.zeros(4)}
        )
    assert_entries(net.state_dict(), before)


def test_load_param_trailing_unit_dims_are_squeezed() -> None:
    """A (3, 8, 1, 1) value loads into a (3, 8) parameter (MindSpore's shape exception)."""
    net = ConvNet()
    value = torch.arange(24.0).reshape(3, 8, 1, 1)
    assert torchaux.load_param_into_net(net, {"fc1.weight": value})[1] == []
    assert torch.equal(net.fc1.weight, value.reshape(3, 8))


def test_load_param_extra_keys_in_place_and_lists() -> None:
    """Extra keys are fine; parameters update in place; the two lists name what was not used."""
    net = ConvNet()
    weight = net.fc1.weight
    params = {"fc1.weight": torch.full((3, 8), 2.0), "conv2.weight": torch.ones(2, 2, 3, 3),
              "extra.weight": torch.ones(1), "epoch": 3}
    param_not_load, ckpt_not_load = torchaux.load_param_into_net(net, params)
    assert net.fc1.weight is weight and torch.equal(weight, params["fc1.weight"])
    assert torch.equal(net.conv2.weight, params["conv2.weight"])
    assert param_not_load == [k for k in NET_KEYS if k not in ("fc1.weight", "conv2.weight")]
    assert ckpt_not_load == ["extra.weight", "epoch"]


def test_load_param_wrapper_prefix_removed() -> None:
    """Keys saved from a wrapper ("backbone.") load into the bare net and leave no list entry."""
    source, net = ConvNet(seed=1), ConvNet(seed=2)
    params = {"backbone." + k: v for k, v in source.state_dict().items()}
    assert torchaux.load_param_into_net(net, params) == ([], [])
    assert_entries(net.state_dict(), expected_entries(source.state_dict()))
    assert torchaux.load_param_into_net(ConvNet(), params, strict_load=True)[0] == NET_KEYS


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_checkpoint_into_net_lists(tmp_path: Any, fmt: str) -> None:
    """load_checkpoint(net=) fills the net; a partial file leaves the rest in param_not_load."""
    source, net = ConvNet(seed=1), ConvNet(seed=2)
    path = _saved(source, tmp_path, fmt, append_dict={"epoch": 2},
                  choice_func=lambda n: n.startswith("fc1"))
    loaded = torchaux.load_checkpoint(path, net=net)
    assert sorted(loaded) == ["epoch", "fc1.bias", "fc1.weight"]
    assert torch.equal(net.fc1.weight, source.fc1.weight)
    param_not_load, ckpt_not_load = torchaux.load_param_into_net(ConvNet(), loaded)
    assert param_not_load == NET_KEYS[:-2] and ckpt_not_load == ["epoch"]


def test_load_param_strict_load_type_error() -> None:
    """strict_load must be a bool."""
    with pytest.raises(TypeError, match="strict_load"):
        torchaux.load_param_into_net(ConvNet(), {}, strict_load=1)  # type: ignore[arg-type]


# -- 6. encryption -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("enc", ENCRYPTIONS[1:], ids=ENCRYPTION_IDS[1:])
def test_encrypted_network_round_trip(tmp_path: Any, fmt: str, enc: tuple[str, bytes, str]) -> None:
    """An encrypted save loads into a fresh net (safetensors too: differs, upstream forbids it)."""
    _, _, mode = enc
    key = secrets.token_bytes(len(enc[1]))
    source, net = ConvNet(seed=1), ConvNet(seed=2)
    path = _saved(source, tmp_path, fmt, enc_key=key, enc_mode=mode)
    torchaux.load_checkpoint(path, net=net, dec_key=key, dec_mode=mode, strict_load=True)
    assert_entries(net.state_dict(), expected_entries(source.state_dict()))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("enc", ENCRYPTIONS[1:], ids=ENCRYPTION_IDS[1:])
def test_wrong_key_or_mode_is_decryption_error(
    tmp_path: Any, fmt: str, enc: tuple[str, bytes, str]
) -> None:
    """A wrong key, a wrong mode or no key raise DecryptionError (a ValueError)."""
    _, key, mode = enc
    path = _saved(ConvNet(), tmp_path, fmt, enc_key=key, enc_mode=mode)
    wrong_key = bytes(b ^ 1 for b in key)
    with pytest.raises(DecryptionError):
        torchaux.load_checkpoint(path, dec_key=wrong_key, dec_mode=mode)
    other = "AES-CBC" if mode == "AES-GCM" else "AES-GCM"
    with pytest.raises(DecryptionError):
        torchaux.load_checkpoint(path, dec_key=key, dec_mode=other)
    with pytest.raises(DecryptionError, match="dec_key"):
        torchaux.load_checkpoint(path)


@pytest.mark.parametrize(
    ("key", "mode", "error"),
    [
        (bytes(15), "AES-GCM", ValueError), (bytes(17), "AES-CBC", ValueError),
        (bytes(24), "SM4-CBC", ValueError), (bytes(32), "SM4-CBC", ValueError),
        (bytes(0), "AES-GCM", ValueError), (bytes(16), "AES-XTS", ValueError),
        ("0" * 16, "AES-GCM", TypeError), (bytearray(16), "AES-GCM", TypeError),
        (bytes(16), None, TypeError),
    ],
    ids=["gcm-15", "cbc-17", "sm4-24", "sm4-32", "empty", "unknown-mode", "str-key",
         "bytearray-key", "none-mode"],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_key_fails_before_any_file(
    tmp_path: Any, fmt: str, key: object, mode: object, error: type
) -> None:
    """Bad key length, type or mode raise before any file exists (differs: TypeError for types)."""
    with pytest.raises(error):
        torchaux.save_checkpoint(ConvNet(), _path(tmp_path), enc_key=key,  # type: ignore[arg-type]
                                 enc_mode=mode, format=fmt)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


# -- 7. CRC ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_crc_save_loads_with_and_without_check(tmp_path: Any, fmt: str) -> None:
    """A CRC file loads with crc_check on and off, silently."""
    net = ConvNet()
    path = _saved(net, tmp_path, fmt, crc_check=True)
    want = expected_entries(net.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_entries(torchaux.load_checkpoint(path, crc_check=True), want)
        assert_entries(torchaux.load_checkpoint(path, crc_check=False), want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_crc_check_on_file_without_crc_warns(tmp_path: Any, fmt: str) -> None:
    """crc_check=True on a file saved without CRC warns and still loads (as upstream)."""
    net = ConvNet()
    path = _saved(net, tmp_path, fmt)
    with pytest.warns(UserWarning, match="crc"):
        loaded = torchaux.load_checkpoint(path, crc_check=True)
    assert_entries(loaded, expected_entries(net.state_dict()))


def _append_bytes(path: str, extra: bytes = b"111") -> None:
    with open(path, "ab") as f:
        f.write(extra)


def test_crc_appended_bytes_fail_safetensors(tmp_path: Any) -> None:
    """Bytes appended to a CRC safetensors file fail the CRC load (test_safetensors_with_crc)."""
    path = _saved(ConvNet(), tmp_path, "safetensors", crc_check=True)
    _append_bytes(path)
    with pytest.raises(IntegrityError):
        torchaux.load_checkpoint(path, crc_check=True)


def test_crc_appended_bytes_fail_ckpt(tmp_path: Any) -> None:
    """Bytes appended to a CRC .ckpt make the CRC load fail (test_ckpt_save_with_crc_failed)."""
    path = _saved(ConvNet(), tmp_path, "ckpt", crc_check=True)
    _append_bytes(path)
    with pytest.raises(IntegrityError):
        torchaux.load_checkpoint(path, crc_check=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_crc_detects_changed_tensor_bytes(tmp_path: Any, fmt: str) -> None:
    """A changed tensor payload byte fails the CRC load; without crc_check it loads the change."""
    source = {"w": torch.full((64,), 1.0)}
    path = _saved(source, tmp_path, fmt, crc_check=True)
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    at = raw.index(torch.full((64,), 1.0).numpy().tobytes()) + 100
    raw[at] ^= 0x40
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(IntegrityError, match="(?i)crc"):
        torchaux.load_checkpoint(path, crc_check=True)
    if fmt == "safetensors":
        assert not torch.equal(torchaux.load_checkpoint(path)["w"], source["w"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_crc_and_encryption_combine(tmp_path: Any, fmt: str) -> None:
    """crc_check with an encryption key saves and loads (differs: upstream files never load)."""
    net = ConvNet()
    path = _saved(net, tmp_path, fmt, crc_check=True, enc_key=bytes(16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = torchaux.load_checkpoint(path, crc_check=True, dec_key=bytes(16))
    assert_entries(loaded, expected_entries(net.state_dict()))


# -- 8. async -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", [True, "thread", "process"])
def test_async_save_produces_loadable_file(
    tmp_path: Any,
    make_saver: Callable[..., AsyncSaver],
    process_saver: ProcessSaver,
    mode: object,
    fmt: str,
) -> None:
    """Thread and process saves produce a loadable file once the handle is waited on (no sleep)."""
    net = ConvNet()
    saver = process_saver if mode == "process" else make_saver()
    path = _path(tmp_path, f"net.{fmt}")
    handle = torchaux.save_checkpoint(net, path, async_save=mode, format=fmt, crc_check=True,
                                      enc_key=bytes(32), append_dict={"step": 9}, saver=saver)
    assert handle.wait(WAIT_S) == path and handle.done()
    loaded = torchaux.load_checkpoint(path, crc_check=True, dec_key=bytes(32))
    assert_entries(loaded, expected_entries(net.state_dict(), {"step": 9}))


# -- 9. safetensors metadata and the documented deviations -------------------------------------


@pytest.mark.parametrize(("flag", "text"), [(True, "True"), (False, "False"), (None, None)])
def test_remove_redundancy_metadata(tmp_path: Any, flag: bool | None, text: str | None) -> None:
    """remove_redundancy is written as "True"/"False" safetensors metadata; absent if not given."""
    safe_open = pytest.importorskip("safetensors").safe_open
    kwargs = {} if flag is None else {"remove_redundancy": flag}
    path = _saved(ConvNet(), tmp_path, "safetensors", **kwargs)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata.get("remove_redundancy") == text
    assert metadata["format"] == "pt"


def test_safetensors_values_metadata_is_typed_json(tmp_path: Any) -> None:
    """append_dict scalars are stored as JSON in "torchaux.values" metadata, types intact."""
    safe_open = pytest.importorskip("safetensors").safe_open
    path = _saved(ConvNet(), tmp_path, "safetensors", append_dict={"epoch": 1, "ok": False})
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["torchaux.values"]) == {"epoch": 1, "ok": False}


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_name_used_as_given(tmp_path: Any, fmt: str) -> None:
    """No extension is appended (differs: MindSpore appends .ckpt/.safetensors)."""
    path = _path(tmp_path, "modelckpt")
    torchaux.save_checkpoint(ConvNet(), path, format=fmt)
    assert os.listdir(tmp_path) == ["modelckpt"]
    assert len(torchaux.load_checkpoint(path, format=fmt)) == len(NET_KEYS)


def test_format_detected_from_content_not_name(tmp_path: Any) -> None:
    """A safetensors file named .ckpt loads as safetensors (differs: upstream goes by the name)."""
    path = _path(tmp_path, "misnamed.ckpt")
    torchaux.save_checkpoint(ConvNet(), path, format="safetensors")
    assert len(torchaux.load_checkpoint(path)) == len(NET_KEYS)
    assert len(torchaux.load_checkpoint(path, format="safetensors")) == len(NET_KEYS)


def test_unknown_kwarg_is_type_error(tmp_path: Any) -> None:
    """An unknown keyword raises TypeError before any I/O (differs: upstream ignores it)."""
    with pytest.raises(TypeError, match="incremental"):
        torchaux.save_checkpoint(ConvNet(), _path(tmp_path), incremental=True)
    assert os.listdir(tmp_path) == []
