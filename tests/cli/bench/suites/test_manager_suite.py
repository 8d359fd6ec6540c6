"""``torchaux bench --manager`` (cli/bench/suites/manager.py) runs end to end on a tiny state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchaux.cli.main import main


@pytest.mark.multiprocess  # the S3 server runs in a child process
def test_manager_bench_reports_every_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("moto.server", reason="needs moto[server] (test extra)")
    out = tmp_path / "r.json"
    assert main(["bench", "--manager", "--size-mib", "6", "--dir", str(tmp_path),
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio" in printed and "put_file" in printed
    r = json.loads(out.read_text())
    for key in ("manager_stall_ratio", "s3_stall_ratio_vs_local_manager", "upload_throughput_ratio"):
        assert r[key] > 0
    assert r["upload_bytes"] == r["put_file_bytes"] == 6 << 20
