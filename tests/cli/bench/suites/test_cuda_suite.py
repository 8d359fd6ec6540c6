"""``torchaux bench --cuda``: refused clearly without a GPU; on one, every figure is there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from torchaux.cli.bench.suites import cuda
from torchaux.cli.main import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_the_suite_refuses_before_any_work(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--cuda", "--dir", str(tmp_path)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("the size checks come after the device check")
    with pytest.raises(ValueError, match="size_mib >= 64"):
        cuda.run_cuda(size_mib=8, directory=str(tmp_path))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_figure_and_ratio_is_reported(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["bench", "--cuda", "--size-mib", "64", "--dir", str(tmp_path), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["load"]["equal"] is True
    assert r["memcpy"]["pinned"]["best_gbps"] > 0
    assert set(r["ratios"]) == {"stage one tensor / pinned memcpy", "stage 64 MiB tensors / pinned memcpy",
                                "save_async / pinned memcpy", "torchaux.load / torch.load",
                                "load_checkpoint / torch.load"}
    assert all(v > 0 for v in r["ratios"].values())
    assert not any(p.name.startswith("torchaux-bench-cuda-") for p in tmp_path.iterdir())
