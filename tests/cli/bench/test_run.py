"""`torchaux bench` harness: paired baselines, secure ratios, the writer probe and the report."""

from __future__ import annotations

import pathlib

import pytest

from torchaux.cli.bench.run import BenchConfig, run_bench
from torchaux.cli.bench.report import format_table

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = BenchConfig(
        size_mib=2, steps=4, every=2, batch=4,
        directory=str(tmp_path_factory.mktemp("bench")),
        methods=("torchaux.save_async", "save_checkpoint AES-GCM+CRC"),
        writer_probe=True,
    )
    return run_bench(cfg)


def test_every_method_is_measured_against_its_own_paired_baseline(results: dict) -> None:
    """Each method ran a no-save loop before and after its measured loop, and overhead uses their mean."""
    for r in results["methods"]:
        before, after = r["paired_baseline_s"]
        assert before > 0 and after > 0
        expected = (r["loop_s"] - (before + after) / 2) / r["saves"]
        assert r["loop_overhead_per_save_s"] == pytest.approx(expected)
        assert r["all_consistent"] and r["exact_at_call"]


def test_secure_methods_get_ratios_to_the_plain_async_save(results: dict) -> None:
    """The issue #3 ratios exist for secure methods only and follow their definitions."""
    plain, gcm = results["methods"]
    assert "durable_speed_vs_plain_async" not in plain
    assert gcm["durable_speed_vs_plain_async"] == pytest.approx(
        plain["durable_steady_s"] / gcm["durable_steady_s"]
    )


def test_writer_probe_covers_every_mode_and_cleans_up(results: dict) -> None:
    """One row per mode with positive figures; no probe file is left behind."""
    rows = results["writer_probe"]
    assert [r["mode"] for r in rows] == ["plain", "AES-GCM", "AES-CBC", "SM4-CBC"]
    for r in rows:
        assert r["seconds"] > 0 and r["gb_per_s"] > 0 and r["cpu_per_wall"] > 0
        assert r["no_fsync_seconds"] > 0
    root = pathlib.Path(results["config"]["directory"])
    assert not [p for p in root.rglob("*") if p.is_file()]


def test_report_shows_ratios_and_probe(results: dict) -> None:
    """The printed table names the paired baseline and the probe's durable-speed ratio."""
    text = format_table(results)
    assert "run just before and after" in text
    probe = text[text.index("writer only"):].splitlines()
    assert "cores busy" in probe[1]
    assert [line.split()[0] for line in probe[2:]] == ["plain", "AES-GCM", "AES-CBC", "SM4-CBC"]
    assert probe[2].split()[4] == "x1.00"  # the plain row against itself


def test_background_cpu_is_reported_per_gib(results: dict) -> None:
    """torchaux methods report their background threads' CPU per GiB saved, and the table shows it."""
    for r in results["methods"]:
        assert r["background_cpu_s_per_gib"] is not None and r["background_cpu_s_per_gib"] > 0
    assert "bg CPU/GiB" in format_table(results)



def test_prepare_warms_torchaux_pools_before_the_loop(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--prepare``: the method's saver is warmed for the training state, so a save allocates nothing."""
    from torchaux.checkpoint.engine.pool import HostBufferPool
    from torchaux.cli.bench.methods import METHODS
    from torchaux.cli.bench.run import _reference, _template, run_one

    allocated: list[int] = []
    real = HostBufferPool._allocate

    def counting(self: HostBufferPool, nbytes: int, pinned: bool) -> object:
        allocated.append(nbytes)
        return real(self, nbytes, pinned)

    monkeypatch.setattr(HostBufferPool, "_allocate", counting)
    cfg = BenchConfig(size_mib=2, steps=4, every=2, batch=4, directory=str(tmp_path),
                      methods=("torchaux.save_async",), prepare=True)
    (tmp_path / "m").mkdir()
    method = METHODS["torchaux.save_async"](str(tmp_path / "m"))
    try:
        method.prepare(_template(cfg))
        warmed = len(allocated)
        method.save(1, _template(cfg), None)  # type: ignore[arg-type]
        method.finish()
    finally:
        method.close()
    assert warmed > 0 and len(allocated) == warmed  # the save took only prepared buffers
    monkeypatch.undo()
    import torch

    result = run_one(cfg, "torchaux.save_async", str(tmp_path / "run"),
                     _reference(cfg, torch.device("cpu")))
    assert result["saves"] == 2 and result["stall_first_s"] > 0 and result["all_consistent"]
