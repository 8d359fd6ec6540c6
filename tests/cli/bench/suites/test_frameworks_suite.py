"""``torchaux bench --frameworks`` (cli/bench/suites/frameworks/) end to end, tiny."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchaux.cli.bench.suites import frameworks

pytest.importorskip("lightning", reason="lightning not installed: pip install 'torchaux[lightning]'")
pytest.importorskip("transformers", reason="transformers not installed: pip install 'torchaux[hf]'")


@pytest.mark.slow  # a warm-up round and one measured round of seven tiny training runs
def test_every_method_saves_complete_checkpoints_in_a_timed_window(tmp_path: Path) -> None:
    lines: list[str] = []
    results = frameworks.run_frameworks(size_mib=1, steps=9, every=3, rounds=1,
                                        directory=str(tmp_path), log=lines.append)
    by_name = {(r.framework, r.method): r for r in results}
    assert {fw for fw, _ in by_name} == {"lightning", "hf"}
    for (fw, method), r in by_name.items():
        assert len(r.rounds) == 1 and r.loop_s > 0, (fw, method)
        if method in ("no checkpoints", "save_strategy='no'"):
            assert r.saves == 0 and r.stall_per_save_s == 0
            continue
        # saves at steps 3, 6 and 9, each holding its step; the one at 6 timed
        assert r.saves == 3 and r.complete == 3, (fw, method, r)
        assert r.stall_per_save_s > 0 and r.durable_s >= r.loop_s, (fw, method, r)
        assert len(r.overheads) == 1 and len(r.paired) == 1
    table = frameworks.format_frameworks(results)
    assert "lightning: torchaux stall per save" in table and "hf: torchaux stall per save" in table
    assert "hf: torchaux loop overhead per save, paired" in table
    assert any("round 1" in line for line in lines)
    assert not any(p.name.startswith("torchaux-bench-fw-") for p in tmp_path.iterdir())


def test_a_run_too_short_for_a_timed_save_is_refused() -> None:
    with pytest.raises(ValueError, match="steps >= 3 x every"):
        frameworks.run_frameworks(steps=8, every=3)
    with pytest.raises(ValueError, match="every >= 3"):
        frameworks.run_frameworks(steps=6, every=2)
    with pytest.raises(ValueError, match="rounds"):
        frameworks.run_frameworks(steps=9, every=3, rounds=0)
