"""`python -m torchaux.cli.bench.disk_io`: rows, cleanup and the command line."""

from __future__ import annotations

import json
import pathlib

from torchaux.checkpoint.storage.direct_io import enable_direct_io
from torchaux.cli.bench import disk_io as bench_io


def test_measure_rows_and_cleanup(tmp_path: pathlib.Path) -> None:
    """One row per method (direct ones where O_DIRECT works), positive figures, no file left."""
    with open(tmp_path / "probe", "wb") as f:
        direct = enable_direct_io(f.fileno())
    (tmp_path / "probe").unlink()
    rows = bench_io.measure(2, str(tmp_path), buffer_mib=(1, 2), rounds=2)
    expected = ["buffered", "direct 1 MiB", "direct 2 MiB"] if direct else ["buffered"]
    assert [r["method"] for r in rows] == expected
    for r in rows:
        assert r["seconds"] > 0 and r["gb_per_s"] > 0 and r["cpu_s"] >= 0
    assert list(tmp_path.iterdir()) == []


def test_main_prints_and_writes_json(tmp_path: pathlib.Path, capsys: object) -> None:
    """The command prints a table and writes the same rows as JSON."""
    out = tmp_path / "io.json"
    assert bench_io.main(["--size-mib", "1", "--buffer-mib", "1", "--rounds", "1",
                          "--dir", str(tmp_path), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows[0]["method"] == "buffered"
    assert "median of 1 rounds" in capsys.readouterr().out  # type: ignore[attr-defined]
