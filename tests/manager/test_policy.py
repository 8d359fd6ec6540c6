"""Save and retention policies (manager/policy.py) and step names (manager/steps.py)."""

from __future__ import annotations

import random

import pytest
import torch

from torchaux.manager.policy import RetentionPolicy, SavePolicy
from torchaux.manager.steps import StepInfo, check_metrics, decode_metadata, parse_step


def infos(*pairs: tuple[int, float | None]) -> list[StepInfo]:
    return [StepInfo(s, {} if loss is None else {"loss": loss}) for s, loss in pairs]


def test_interval() -> None:
    assert [s for s in range(10) if SavePolicy(4).should_save(s)] == [0, 4, 8]
    with pytest.raises(TypeError):
        SavePolicy(2.0)  # type: ignore[arg-type]


def test_keep_latest_none_keeps_everything() -> None:
    assert RetentionPolicy(keep_latest=None).to_delete(infos((1, None), (2, None))) == []


def test_best_ignores_steps_without_metrics_and_ties_go_to_the_newer() -> None:
    p = RetentionPolicy(keep_latest=1, best_fn="loss", keep_best=1)
    steps = infos((1, 0.2), (2, None), (3, 0.2), (4, 0.9))
    assert p.best(steps) == [3]
    assert p.to_delete(steps) == [1, 2]


def test_the_newest_committed_step_is_never_deleted_whatever_the_policy() -> None:
    rng = random.Random(0)
    for _ in range(300):
        steps = sorted(rng.sample(range(200), rng.randint(1, 12)))
        committed = [StepInfo(s, {"loss": rng.random()} if rng.random() < 0.7 else {}) for s in steps]
        p = RetentionPolicy(
            keep_latest=rng.randint(1, 4), keep_every_steps=rng.choice([None, 7, 50]),
            best_fn="loss", best_mode=rng.choice(["min", "max"]), keep_best=rng.choice([None, 1, 2]),
        )
        deleted = p.to_delete(committed)
        assert steps[-1] not in deleted
        assert set(deleted) <= set(steps)
        kept = [s for s in steps if s not in deleted]
        assert kept[-p.keep_latest:] == steps[-p.keep_latest:]


def test_step_names_are_exact() -> None:
    assert parse_step("step-0") == 0 and parse_step("step-10") == 10
    for name in ["step-", "step-01", "step--1", "step-1.tmp", ".step-1", "step-1 ", "Step-1"]:
        assert parse_step(name) is None, name


def test_damaged_commit_markers_do_not_count() -> None:
    for data in [b"", b"{", b'{"step": -1}', b'{"step": "3"}', b'{"metrics": {}}',
                 b'{"step": 3, "metrics": {"loss": "x"}}', b'{"step": 3, "encrypted": 5}']:
        assert decode_metadata(data, "m") is None, data


def test_metrics_accept_0d_tensors() -> None:
    assert check_metrics({"loss": torch.tensor(0.25)}) == {"loss": 0.25}
    with pytest.raises(TypeError):
        check_metrics({1: 0.5})
