"""Tests for torchaux.training.affinity (per-thread CPU binding).

Real bindings happen on helper threads only, never on pytest's main thread; an
autouse fixture checks that the main thread's mask is unchanged after every
test.  Argument expansion is checked against fake OS calls, so it does not
depend on how many cores this machine has.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from torchaux.training import affinity
from torchaux.training.affinity import (
    available_cores,
    cores_excluding,
    get_thread_affinity,
    reset_thread_affinity,
    set_thread_affinity,
    thread_affinity,
)

T = TypeVar("T")
WAIT_S = 10.0


@pytest.fixture(autouse=True)
def _main_thread_mask_untouched() -> Iterator[None]:
    """Fail any test that leaves pytest's main thread bound differently."""
    if not hasattr(os, "sched_getaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    yield
    after = os.sched_getaffinity(0)
    if after != before:
        os.sched_setaffinity(0, before)
    assert after == before, f"main thread mask changed from {before} to {after}"


@pytest.fixture
def two_cores() -> tuple[int, int]:
    """Two distinct cores this process may use; skip where that is not possible."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no per-thread CPU affinity on this platform (os.sched_setaffinity)")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip(f"needs at least 2 cores available to the process, found {len(cores)}")
    return cores[0], cores[1]


class FakeOS:
    """Stands in for the kernel: a 16-CPU machine whose cpuset allows ``allowed``."""

    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed
        self.mask = set(allowed)
        self.calls: list[set[int]] = []

    def sched_setaffinity(self, pid: int, cores: set[int]) -> None:
        assert pid == 0
        self.calls.append(set(cores))
        if not set(cores) & self.allowed:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.mask = set(cores) & self.allowed

    def sched_getaffinity(self, pid: int) -> set[int]:
        return set(self.mask)


@pytest.fixture
def fake_os(monkeypatch: pytest.MonkeyPatch) -> FakeOS:
    """Route the module's OS calls to a FakeOS (process-wide, so no real thread moves)."""
    fake = FakeOS(allowed=set(range(12)))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_setaffinity", fake.sched_setaffinity, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", fake.sched_getaffinity, raising=False)
    monkeypatch.setattr(affinity, "_PROCESS_CORES", frozenset(range(12)))
    monkeypatch.setattr(affinity, "_local", threading.local())
    return fake


def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread; return its result or re-raise its exception here."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed back to the test thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(WAIT_S)
    assert not thread.is_alive(), "thread did not finish"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def _cpus_allowed_list(native_id: int) -> str | None:
    status = Path(f"/proc/self/task/{native_id}/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return None


def test_worker_binding_changes_the_worker_only(two_cores: tuple[int, int]) -> None:
    """A worker binding itself moves its own mask, not the main thread's; reset restores it."""
    _, b = two_cores
    main_before = os.sched_getaffinity(0)
    bound, release = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def worker() -> None:
        seen["tid"] = threading.get_native_id()
        seen["before"] = os.sched_getaffinity(0)
        try:
            set_thread_affinity([b, b])
        finally:
            bound.set()
        release.wait(WAIT_S)
        reset_thread_affinity()
        seen["after"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert bound.wait(WAIT_S)
        tid = seen["tid"]
        assert isinstance(tid, int)
        assert os.sched_getaffinity(tid) == {b}
        assert get_thread_affinity(tid) == [b]
        assert _cpus_allowed_list(tid) in (None, str(b))
        assert os.sched_getaffinity(0) == main_before
    finally:
        release.set()
        thread.join(WAIT_S)
    assert seen["after"] == seen["before"]


def test_children_inherit_and_parent_resets(two_cores: tuple[int, int]) -> None:
    """torch_npu's pattern: set, start a child, reset; the child keeps the binding."""
    a, _ = two_cores

    def parent() -> tuple[set[int], set[int], set[int]]:
        before = os.sched_getaffinity(0)
        parent_reset = threading.Event()
        child_mask: list[set[int]] = []

        def child() -> None:
            parent_reset.wait(WAIT_S)
            child_mask.append(os.sched_getaffinity(0))

        set_thread_affinity([a, a])
        thread = threading.Thread(target=child)
        thread.start()
        reset_thread_affinity()
        parent_reset.set()
        thread.join(WAIT_S)
        return before, os.sched_getaffinity(0), child_mask[0]

    before, after, child = in_thread(parent)
    assert child == {a}
    assert after == before


def test_nested_sets_reset_in_lifo_order(two_cores: tuple[int, int]) -> None:
    """Each reset undoes one set, most recent first; extra resets change nothing."""
    a, b = two_cores

    def body() -> list[set[int]]:
        masks = [os.sched_getaffinity(0)]
        set_thread_affinity([a, a])
        set_thread_affinity([[b, b]])
        masks.append(os.sched_getaffinity(0))
        reset_thread_affinity()
        masks.append(os.sched_getaffinity(0))
        reset_thread_affinity()
        reset_thread_affinity()
        masks.append(os.sched_getaffinity(0))
        return masks

    original, inner, middle, final = in_thread(body)
    assert (inner, middle, final) == ({b}, {a}, original)


def test_none_binds_to_every_available_core(two_cores: tuple[int, int]) -> None:
    """set_thread_affinity(None) widens a pinned thread to available_cores()."""
    a, _ = two_cores

    def body() -> set[int]:
        with thread_affinity([a, a]):
            set_thread_affinity(None)
            return os.sched_getaffinity(0)

    assert in_thread(body) == set(available_cores())


def test_context_manager_restores_the_entry_mask(two_cores: tuple[int, int]) -> None:
    """thread_affinity restores the entry mask after an error and after an unpaired set."""
    a, b = two_cores

    def body() -> tuple[list[int], set[int], set[int], set[int]]:
        before = os.sched_getaffinity(0)
        with pytest.raises(KeyError):
            with thread_affinity([b, b]) as inside:
                set_thread_affinity([a, a])
                raise KeyError("boom")
        after = os.sched_getaffinity(0)
        reset_thread_affinity()
        return inside, before, after, os.sched_getaffinity(0)

    inside, before, after, after_extra_reset = in_thread(body)
    assert inside == [b]
    assert after == before
    assert after_extra_reset == before


def test_works_regardless_of_cpu_affinity_conf(
    two_cores: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unlike torch_npu, binding happens with CPU_AFFINITY_CONF unset or set to off."""
    _, b = two_cores
    for value in (None, "0"):
        if value is None:
            monkeypatch.delenv("CPU_AFFINITY_CONF", raising=False)
        else:
            monkeypatch.setenv("CPU_AFFINITY_CONF", value)

        def body() -> list[int]:
            with thread_affinity([b, b]) as cores:
                return cores

        assert in_thread(body) == [b]


@pytest.mark.parametrize(
    "bad",
    [[1, 2, 3], [], (0, 1), [[0, 3], 5], [[0, 1], [2]], "0-1", [0.0, 1.0], 3],
    ids=["three", "empty", "tuple", "mixed", "short-pair", "string", "floats", "int"],
)
def test_malformed_ranges_raise_value_error(bad: object, fake_os: FakeOS) -> None:
    """Forms torch_npu rejects raise ValueError("Invalid core range...") and bind nothing."""
    with pytest.raises(ValueError, match="Invalid core range"):
        set_thread_affinity(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid core range"):
        with thread_affinity(bad):  # type: ignore[arg-type]
            pass
    assert fake_os.calls == []


@pytest.mark.parametrize("bad", [[-1, 5], [2, -3], [3, 1], [[0, 1], [5, 4]], [[0, "1"]]])
def test_bad_range_values_raise_value_error(bad: list[object], fake_os: FakeOS) -> None:
    """Negative, reversed or non-int bounds raise ValueError("Invalid core range values")."""
    with pytest.raises(ValueError, match="Invalid core range values"):
        set_thread_affinity(bad)  # type: ignore[arg-type]
    assert fake_os.calls == []


@pytest.mark.parametrize(
    ("core_range", "expected"),
    [
        ([2, 5], {2, 3, 4, 5}),
        ([[2, 5], [7, 9]], {2, 3, 4, 5, 7, 8, 9}),
        ([[2, 7], [4, 9]], set(range(2, 10))),
        ([3, 3], {3}),
        (None, set(range(12))),
    ],
)
def test_ranges_expand_like_torch_npu(
    core_range: list[int] | list[list[int]] | None, expected: set[int], fake_os: FakeOS
) -> None:
    """Inclusive ranges are expanded and overlaps merged before one kernel call."""
    set_thread_affinity(core_range)
    assert fake_os.calls == [expected]
    reset_thread_affinity()
    assert fake_os.mask == set(range(12))


def test_nonexistent_and_forbidden_cores(fake_os: FakeOS) -> None:
    """Ids past the CPU count or outside the cpuset are skipped with a warning; none left fails."""
    with pytest.warns(RuntimeWarning) as record:
        set_thread_affinity([[0, 0], [10, 40]])
    messages = [str(w.message) for w in record]
    assert any("core ids >= 16 ignored" in m for m in messages)
    assert any("[12, 13, 14, 15] are not available" in m for m in messages)
    assert fake_os.calls[-1] == {0, 10, 11, 12, 13, 14, 15}
    assert fake_os.mask == {0, 10, 11}
    with pytest.raises(ValueError, match="none of them is available"):
        set_thread_affinity([12, 15])
    with pytest.raises(ValueError, match="no core to bind to"), pytest.warns(RuntimeWarning):
        set_thread_affinity([64, 70])
    assert fake_os.mask == {0, 10, 11}
    reset_thread_affinity()
    assert fake_os.mask == set(range(12))


def test_real_kernel_skips_a_nonexistent_core(two_cores: tuple[int, int]) -> None:
    """On the real kernel an id past the CPU count is skipped with a warning."""
    a, _ = two_cores
    beyond = (os.cpu_count() or 1) + 3

    def body() -> set[int]:
        with pytest.warns(RuntimeWarning, match="ignored"):
            with thread_affinity([[a, a], [beyond, beyond]]):
                return os.sched_getaffinity(0)

    assert in_thread(body) == {a}


def test_no_per_thread_affinity_means_validated_warning_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without os.sched_setaffinity calls still validate, then warn and change nothing."""
    monkeypatch.delattr(os, "sched_setaffinity", raising=False)
    with pytest.warns(RuntimeWarning, match="does nothing here"):
        set_thread_affinity([0, 0])
    with pytest.warns(RuntimeWarning, match="does nothing here"):
        reset_thread_affinity()
    with pytest.warns(RuntimeWarning, match="does nothing here"):
        with thread_affinity([0, 0]) as cores:
            assert cores == available_cores()
    with pytest.raises(ValueError, match="Invalid core range"):
        set_thread_affinity([])
    assert get_thread_affinity() == available_cores()


def test_cores_excluding_returns_mergeable_ranges() -> None:
    """The complement is returned as merged inclusive ranges, [] when nothing is left."""
    assert cores_excluding({0, 4, 5}, available=range(8)) == [[1, 3], [6, 7]]
    assert cores_excluding([], available=[3, 1, 2, 7]) == [[1, 3], [7, 7]]
    assert cores_excluding(range(4), available=range(4)) == []
    assert cores_excluding(available_cores()) == []


def test_writer_thread_pins_away_from_the_trainer(two_cores: tuple[int, int]) -> None:
    """A writer bound to cores_excluding(trainer cores) shares no core with the trainer."""
    a, _ = two_cores

    def trainer() -> tuple[list[int], set[int], set[int]]:
        with thread_affinity([a, a]):
            spare = cores_excluding(get_thread_affinity())
            writer_mask: list[set[int]] = []

            def writer() -> None:
                with thread_affinity(spare):
                    writer_mask.append(os.sched_getaffinity(0))

            thread = threading.Thread(target=writer)
            thread.start()
            thread.join(WAIT_S)
            return get_thread_affinity(), writer_mask[0], set(available_cores()) - {a}

    trainer_cores, writer_cores, expected = in_thread(trainer)
    assert trainer_cores == [a]
    assert writer_cores == expected and a not in writer_cores
