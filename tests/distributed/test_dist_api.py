"""torchaux.distributed.save_async/load across spawned gloo ranks (tests src/torchaux/distributed/api.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dist_workers
import torchaux.distributed as td
from torchaux.distributed.metadata import read_metadata

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def saved_on_4(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("four")
    directory, expected = root / "ckpt", root / "expected.pt"
    dist_workers.run("save_fsdp", 4, str(directory), str(expected))
    return directory, expected


def test_fsdp_save_on_4_loads_on_4_with_immediate_step(saved_on_4: tuple[Path, Path]) -> None:
    directory, _ = saved_on_4  # the worker asserted the round trip; check the files here
    meta = read_metadata(directory)
    files = {info.relative_path for k, info in meta.storage_data.items() if k != td.EXTRAS_KEY}
    assert len(files) == 4 and all(f.startswith("__") and f.endswith(".distcp") for f in files)
    assert sorted(p.name for p in directory.iterdir() if p.name.endswith(".distcp")) == sorted(files)


def test_replicated_tensor_is_written_once(saved_on_4: tuple[Path, Path]) -> None:
    meta = read_metadata(saved_on_4[0])
    chunks = [k for k in meta.storage_data if k != td.EXTRAS_KEY and k.fqn == "rep"]
    assert len(chunks) == 1
    assert len(meta.state_dict_metadata["tp"].chunks) == 4  # column shards of the TP tensor


def test_save_on_4_loads_on_2(saved_on_4: tuple[Path, Path]) -> None:
    dist_workers.run("load_fsdp", 2, str(saved_on_4[0]), str(saved_on_4[1]))


def test_save_on_4_loads_into_one_plain_process(saved_on_4: tuple[Path, Path]) -> None:
    directory, expected_path = saved_on_4
    expected = torch.load(expected_path, weights_only=True)
    dist_workers.assert_same(expected, td.load_full(directory))
    plain = dist_workers.full(expected)  # same structure, plain full-size tensors
    for value in plain["model"].values():
        value.zero_()
    plain["tp"].zero_()
    td.load(plain, directory)
    dist_workers.assert_same(expected["model"], plain["model"])
    assert torch.equal(expected["tp"], plain["tp"])


def test_fsdp_at_2_and_stock_dcp_interop_and_process_checkpointer(tmp_path: Path) -> None:
    dist_workers.run("interop", 2, str(tmp_path))


def test_model_overlap_loads_the_state_at_the_call_and_sharded_tensor_is_refused(
    tmp_path: Path,
) -> None:
    dist_workers.run("overlapped_and_sharded_tensor", 2, str(tmp_path))


def test_failed_rank_commits_nothing_and_every_rank_raises(tmp_path: Path) -> None:
    dist_workers.run("failing_rank", 2, str(tmp_path / "ckpt"))
