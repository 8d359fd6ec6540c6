"""``torchaux bench --distributed`` (cli/bench/suites/distributed.py, ranks.py) end to end, tiny."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from torchaux.cli.bench.suites import distributed
from torchaux.cli.bench.suites.ranks import METHODS
from torchaux.cli.main import main


@pytest.mark.multiprocess  # every method on two spawned gloo ranks, then the loads
def test_every_method_saves_complete_checkpoints_and_reports_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHAUX_BENCH_NPROC", "2")
    out = tmp_path / "r.json"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert main(["bench", "--distributed", "--size-mib", "2", "--steps", "4", "--every", "2",
                 "--malloc-mmap-threshold", "131072", "--dir", str(tmp_path), "--json", str(out)]) == 0
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ  # set for the ranks only
    printed = capsys.readouterr().out
    assert "ratios" in printed and all(m in printed for m in METHODS)
    r = json.loads(out.read_text())
    assert list(r["methods"]) == list(METHODS)
    for m in r["methods"].values():
        # One save window (a save at step 1) beside one no-save window; the
        # checkpoint loads back equal to the state at step 1 on both ranks.
        assert m["saves"] == 1 and m["complete"] == 1, m
        assert m["malloc_env"] == "131072"  # the ranks ran with the fixed threshold
        assert m["stall_s"] > 0 and m["durable_s"] > 0 and m["shard_mib"] > 0
    assert set(r["load"]) == {"2->2", "2->1"}
    assert {"stall_s", "overhead_s", "durable_s", "load 2->2", "load 2->1"} <= set(r["ratios"])
    assert not any(p.name.startswith("torchaux-bench-dist-") for p in tmp_path.iterdir())


def test_bad_settings_are_refused_before_any_rank_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nproc >= 2"):
        distributed.run_distributed(nproc=1, root=str(tmp_path))
    with pytest.raises(ValueError, match="at least 2 x every"):
        distributed.run_distributed(steps=4, every=3, root=str(tmp_path))
    with pytest.raises(ValueError, match="malloc_mmap_threshold"):
        distributed.run_distributed(malloc_mmap_threshold=0, root=str(tmp_path))
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        distributed.run_distributed(device="tpu", root=str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_without_a_gpu_is_refused_with_what_to_do(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device.*--device cpu"):
        distributed.run_distributed(nproc=1, device="cuda", root=str(tmp_path))
    assert main(["bench", "--distributed", "--device", "cuda", "--dir", str(tmp_path)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_a_failed_dcp_method_is_a_row_and_the_ratios_use_the_modes_that_ran() -> None:
    """DCP's process checkpointer failed on CUDA DTensors (torch 2.11): the table says so."""
    row = {"stall_s": 1.0, "call_s": 1.0, "overhead_s": 2.0, "durable_s": 4.0, "rss_added_mib": 1.0,
           "rss_added_x_shard": 1.0, "complete": 1, "saves": 1, "shard_mib": 8.0}
    methods = {m: dict(row) for m in METHODS}
    methods["dcp.async_save process"] = {"method": "dcp.async_save process", "error": "KeyError: x"}
    methods["torchaux save_async"].update(stall_s=0.25, overhead_s=0.5, durable_s=1.0)
    load = {"1->1": {"dcp.load": 2.0, "torchaux load": 1.0}}
    ratios = distributed._ratios(methods, load)
    assert ratios == {"stall_s": 0.25, "overhead_s": 0.25, "durable_s": 0.25, "load 1->1": 0.5}
    text = distributed.format_distributed({
        "nproc": 1, "device": "cuda", "size_mib": 8, "width": 64, "steps": 6, "every": 3,
        "methods": methods, "load": load, "ratios": ratios})
    assert "dcp.async_save process" in text and "failed: KeyError: x" in text
    assert "NCCL ranks on CUDA" in text


@pytest.mark.multiprocess  # one spawned rank whose job fails
def test_a_failing_rank_reports_its_error_and_stderr(tmp_path: Path) -> None:
    """A rank's failure reaches the caller with the rank's own stderr (its log is deleted after)."""
    missing = str(tmp_path / "no-such-checkpoint")
    job = {"kind": "load", "width": 16, "repeats": 1, "device": "cpu",
           "dcp_dir": missing, "torchaux_dir": missing, "out": str(tmp_path / "out")}
    with pytest.raises(RuntimeError, match=r"a load job on 1 rank\(s\) failed") as info:
        distributed._run_ranks(1, job)
    assert "--- rank 0 ---" in str(info.value)
    assert info.value.__cause__ is not None  # the spawn's own exception, kept
