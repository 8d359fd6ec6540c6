"""Every state a power loss could leave during a CheckpointManager save resumes from a complete step.

A real manager save's file-system calls are recorded (tests/checkpoint/fsrecord.py):
the step's temp folder, the state file and the commit marker (atomic, fsynced
commits), the folder's publishing rename (``storage/directory.py``), the
``latest`` pointer, and retention's deletions (renamed away, then removed:
``storage/retire.py``).  Every crash state the persistence model allows is
rebuilt on disk and a new :class:`~torchaux.CheckpointManager` is opened on
it, as a restarted job would:

* ``latest_step()`` is the newest step committed before the save or the new
  one (the newest once the save returned), and ``restore()`` loads it;
* ``all_steps()`` is a set the save passes through (retention never leaves
  the newest committed step deleted), and every listed step restores complete;
* the ``latest`` pointer, where present, names a listed step;
* temp folders are never taken for steps: after opening, no temp or aside
  folder remains (they belong to a dead process), and the next save commits.

Scenarios: a save whose retention deletes the oldest step, a forced re-save
of an existing step (the old folder renamed aside), and a first save.
Both directory-order modes of the model are explored; a negative control (a
step published without fsyncing its files) must be caught.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fsrecord import Recorder, State, Tree, distinct

import torchaux
from torchaux import _knobs
from torchaux.checkpoint.storage import directory as storage_directory
from torchaux.checkpoint.storage.commit import TEMP_MARKER
from torchaux.checkpoint.storage.directory import OLD_MARKER
from torchaux.manager.steps import LATEST_NAME, parse_step

#: A pid above Linux's largest pid_max (2**22): the crashed writer is gone.
DEAD_PID = "4194305"
KEY = bytes(range(32))
KEEP = 2
# Small buffers: each state file (~18 KB) is 5 writes, explored in every combination.
_SMALL = {"write_buffer_bytes": 4096, "direct_io_buffer_bytes": 4096}


def _state(step: int, version: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3000,), float(step) + version / 10),
            "b": torch.full((1500,), -float(step))}


@dataclass
class Scenario:
    """Steps saved before the recording, the recorded save, and what it may pass through."""

    before: list[int]
    step: int
    force: bool = False
    #: the sets of committed steps a crash may leave, in the save's order
    sets: tuple[frozenset[int], ...] = ()
    #: step -> versions its folder may hold (a forced re-save writes version 1)
    versions: dict[int, set[int]] | None = None
    #: the verdict once the save returned
    final: str = ""
    #: encrypt the steps (save_checkpoint's AES-GCM path instead of save_async's)
    encrypted: bool = False

    def manager(self, run: str) -> torchaux.CheckpointManager:
        return torchaux.CheckpointManager(run, keep_latest=KEEP,
                                          enc_key=KEY if self.encrypted else None)


SCENARIOS = {
    "save, retention deletes the oldest": Scenario(
        [1, 2], 3, sets=(frozenset({1, 2}), frozenset({1, 2, 3}), frozenset({2, 3})),
        final="ok [2, 3]"),
    "forced re-save of the newest step": Scenario(
        [1, 2], 2, force=True, sets=(frozenset({1, 2}),), versions={2: {0, 1}},
        final="ok [1, 2] 2@v1"),
    "first save": Scenario([], 1, sets=(frozenset(), frozenset({1})), final="ok [1]"),
    "encrypted save, retention deletes the oldest": Scenario(
        [1, 2], 3, sets=(frozenset({1, 2}), frozenset({1, 2, 3}), frozenset({2, 3})),
        final="ok [2, 3]", encrypted=True),
}


@dataclass
class Recording:
    initial: Tree
    ops: list
    scenario: Scenario


def _record(root: Path, monkeypatch: pytest.MonkeyPatch, name: str,
            during: Callable[[pytest.MonkeyPatch], None] | None = None) -> Recording:
    """Save the scenario's earlier steps, then record the manager's whole save (and close)."""
    sc = SCENARIOS[name]
    root.mkdir()
    run = str(root / "run")
    with _knobs.override(**_SMALL):
        if sc.before:
            with sc.manager(run) as mgr:
                for step in sc.before:
                    mgr.save(step, _state(step))
        rec = Recorder(str(root))
        with monkeypatch.context() as patched:
            if during is not None:
                during(patched)
            with rec.active(monkeypatch):
                with sc.manager(run) as mgr:
                    mgr.save(sc.step, _state(sc.step, int(sc.force)), force=sc.force).wait()
    rec.verify()
    return Recording(rec.initial, rec.ops, sc)


def _dead(name: str) -> str:
    """A temp name as the crashed (now dead) process left it: its pid replaced by a dead one."""
    if TEMP_MARKER not in name:
        return name
    head, tail = name.split(TEMP_MARKER, 1)
    return head + TEMP_MARKER + re.sub(rf"(^|-){os.getpid()}-", rf"\g<1>{DEAD_PID}-", tail, count=1)


def _materialize(state: State, into: str) -> None:
    def fix(path: str) -> str:
        return "/".join(_dead(part) for part in path.split("/"))

    State({fix(k): v for k, v in state.items()},
          frozenset(fix(d) for d in state.dirs)).materialize(into)


def _key(state: State) -> tuple:
    """What opening the run can depend on: names everywhere, contents outside temp folders.

    The manager lists step folders by name and reads only those and ``latest``;
    temp folders (a temp name at any level) are only removed, by name.
    """
    files = tuple(sorted((k, v if TEMP_MARKER not in k and OLD_MARKER not in k else b"")
                         for k, v in state.items()))
    return files, tuple(sorted(state.dirs))


def _verdict(state: State, sc: Scenario, *, recover: bool) -> str:
    """'ok <steps>' or what a restarted job would get wrong in this crash state."""
    try:
        return _check(state, sc, recover=recover)
    except Exception as exc:  # noqa: BLE001 - any failure to resume is the finding
        return f"error {type(exc).__name__}: {exc}"


def _check(state: State, sc: Scenario, *, recover: bool) -> str:
    with tempfile.TemporaryDirectory() as d, _knobs.override(**_SMALL):
        _materialize(state, d)
        run = os.path.join(d, "run")
        if not os.path.isdir(run):
            return "ok []" if frozenset() in sc.sets else "run directory lost"
        held = ""
        with sc.manager(run) as mgr:
            steps = frozenset(mgr.all_steps())
            if steps not in sc.sets:
                return f"steps {sorted(steps)}"
            held = ""
            for step in sorted(steps):
                loaded = mgr.restore(step)
                versions = (sc.versions or {}).get(step, {0})
                match = [v for v in versions if torch.equal(loaded["w"], _state(step, v)["w"])]
                if not match:
                    return f"step {step} restores wrong values"
                held += f" {step}@v{match[0]}" if sc.versions and step in sc.versions else ""
            latest = mgr.latest_step()
            if steps and not torch.equal(mgr.restore()["w"], mgr.restore(latest)["w"]):
                return "restore() is not latest_step()"
            pointer = os.path.join(run, LATEST_NAME)
            if os.path.exists(pointer):
                with open(pointer, "rb") as f:
                    text = f.read()
                if not re.fullmatch(rb"\d+\n", text) or int(text) not in steps:
                    return f"latest pointer {text!r} names no committed step"
            left = [n for n in os.listdir(run) if parse_step(n) is None and n != LATEST_NAME]
            if left:
                return f"leftovers {sorted(left)}"
            if recover:
                mgr.save(9, _state(9)).wait()
        if recover:
            with sc.manager(run) as again:
                if again.latest_step() != 9 or not torch.equal(again.restore()["w"], _state(9)["w"]):
                    return "the next save does not resume"
    return f"ok {sorted(steps)}{held}"


def _explore(rec: Recording, orders: tuple[str, ...] = ("ordered", "any"), *,
             recover: bool = True, stop_when: Callable[[str], bool] | None = None
             ) -> tuple[int, Counter, list]:
    """(states explored, verdicts of the distinct states, failures as (order, verdict, points))."""
    sc = rec.scenario
    total, verdicts, bad, seen = 0, Counter(), [], {}
    final = len(rec.ops)
    for order in orders:
        n, states = distinct(rec.initial, rec.ops, order=order)
        total += n
        for state, points in states.values():
            k = _key(state)
            if k not in seen:
                seen[k] = _verdict(state, sc, recover=recover)
                verdicts[seen[k]] += 1
            verdict = seen[k]
            if not verdict.startswith("ok") or (final in points and verdict != sc.final):
                bad.append((order, verdict, sorted(set(points))[:5]))
                if stop_when is not None and stop_when(verdict):  # a control needs one finding
                    return total, verdicts, bad
    return total, verdicts, bad


@pytest.mark.parametrize("name", [n for n in sorted(SCENARIOS) if n != "first save"])
def test_every_crash_state_resumes_from_a_complete_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """All crash states of the save: a complete step, the newest once committed, recoverable."""
    rec = _record(tmp_path / "r", monkeypatch, name)
    kinds = [op[0] for op in rec.ops]
    assert kinds.count("write") >= 3 and "mkdir" in kinds and "rmdir" in kinds, kinds
    n, verdicts, bad = _explore(rec)
    assert n > 2 * len(rec.ops)
    assert len(verdicts) >= 2, verdicts  # crash states on both sides of the commit
    assert bad == [], (verdicts, bad[:5])


def test_first_save_survives_a_power_loss_after_it_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first save into a new run directory: committed means durable, run directory included."""
    rec = _record(tmp_path / "r", monkeypatch, "first save")
    _, verdicts, bad = _explore(rec, recover=False)
    assert bad == [], (verdicts, bad[:5])


def test_first_save_states_are_never_torn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the commit a first save leaves no step (never a partial one); only durability fails."""
    rec = _record(tmp_path / "r", monkeypatch, "first save")
    _, verdicts, bad = _explore(rec)
    assert verdicts["ok []"] >= 1 and verdicts["ok [1]"] >= 1, verdicts
    assert {v for _, v, _ in bad} <= {"ok []"}, bad[:5]  # only the lost-after-commit state


def _publish_without_fsync(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(storage_directory, "_fsync_path", lambda path: None)
    mp.setattr(_knobs, "fsync_enabled", lambda: False)


def _replace_by_two_renames(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(storage_directory, "_exchange", lambda a, b: False)  # the non-Linux fallback


#: control -> (patch, scenario, what must be found in the failures).
CONTROLS = {
    # TORCHAUX_FSYNC=0: the publishing rename can persist before the files' data.
    "steps published without fsync": (
        _publish_without_fsync, "save, retention deletes the oldest",
        lambda v: "wrong values" in v or v.startswith(("steps", "error"))),
    # The old folder renamed aside, then the new one in: a crash between the two
    # renames leaves no step under the name (what this explorer found before
    # publish_directory swapped the folders in one renameat2(RENAME_EXCHANGE)).
    "re-save by two renames": (
        _replace_by_two_renames, "forced re-save of the newest step",
        lambda v: v == "steps [1]"),
}


@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_negative_controls_are_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, control: str
) -> None:
    """A deliberately weakened commit loses or tears the newest step: the explorer sees it."""
    patch, scenario, found = CONTROLS[control]
    rec = _record(tmp_path / "r", monkeypatch, scenario, during=patch)
    _, verdicts, bad = _explore(rec, ("ordered",), recover=False, stop_when=found)
    assert bad and found(bad[-1][1]), (verdicts, bad[:5])
