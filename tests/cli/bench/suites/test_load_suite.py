"""``torchaux bench --load`` (cli/bench/suites/load.py) on a tiny state."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from torchaux.cli.bench.suites import load as suite


@pytest.mark.multiprocess  # one child process per measured load
def test_load_suite_reports_ratios_against_torch_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    args = argparse.Namespace(size_mib=1, dir=str(tmp_path), json=str(out), verbose=False, seed=0,
                              methods=("torchaux.load",), rounds=1)
    assert suite.main(args) == 0
    printed = capsys.readouterr().out
    assert "torchaux.load" in printed and "x torch" in printed
    r = json.loads(out.read_text())
    assert set(r["methods"]) == {"torch.load", "torchaux.load"}  # the baseline is always run
    assert r["methods"]["torch.load"]["warm_ratio"] == 1.0
    for row in r["methods"].values():
        assert row["consistent"] and row["cold_gbps"] > 0 and row["peak_rss_mib"] >= 0
    assert r["loaded_bytes"] >= 1 << 20


def test_every_method_loads_the_same_state(tmp_path: Path) -> None:
    state = suite.make_state(1)
    suite._write_files(state, str(tmp_path))
    for name, (file, how) in suite.METHODS.items():
        got = suite._load(how, str(tmp_path / file))
        assert all((got[k] == v).all() for k, v in state.items()), name
        assert suite._touch(got) >= 0


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown load bench methods"):
        suite.run_load_bench(1, methods=("nope",))
