"""Every saver at interpreter exit and after os.fork(): bounded flush, Ctrl-C, atexit saves, fork."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.multiprocess

# A sink that never finishes: the stand-in for a hung network file system.
HUNG = """
import contextlib, sys, threading, torch, torchaux
@contextlib.contextmanager
def hung_sink(path):
    print("writer entered", flush=True)
    threading.Event().wait()
    yield
saver = torchaux.AsyncSaver(sink=hung_sink)
torchaux.save_async(torch.ones(2), sys.argv[1], saver=saver)
"""


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, **(env or {})})


def test_exit_flush_is_bounded_on_a_hung_file_system(tmp_path: Path) -> None:
    """A save that never finishes is abandoned after TORCHAUX_EXIT_FLUSH_TIMEOUT_S, with an ERROR naming it."""
    target = str(tmp_path / "x.pt")
    proc = _run(HUNG + 'print("main done", flush=True)\n', target,
                env={"TORCHAUX_EXIT_FLUSH_TIMEOUT_S": "1"})
    assert "main done" in proc.stdout
    assert "exit flush timeout" in proc.stderr and target in proc.stderr
    assert not os.path.exists(target)


def test_ctrl_c_abandons_the_exit_flush(tmp_path: Path) -> None:
    """SIGINT while the exit flush waits ends it at once (no second Ctrl-C, no misleading 'failed')."""
    target = str(tmp_path / "x.pt")
    proc = subprocess.Popen([sys.executable, "-c", HUNG + 'print("main done", flush=True)\n', target],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen = ""
    while "writer entered" not in seen or "main done" not in seen:
        line = proc.stdout.readline()
        assert line, "the child ended before the save reached its sink"
        seen += line
    # "main done" is the script's last line: the interpreter is exiting.  Each
    # SIGINT that lands before the flush starts is a KeyboardInterrupt in the
    # script; the first one during the flush must end the process.
    for _ in range(50):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=2)
            break
        except subprocess.TimeoutExpired:
            continue
    _, err = proc.communicate(timeout=60)
    assert proc.returncode is not None
    assert "exit flush interrupted" in err, err
    assert "never waited for" not in err
    assert "exit flush timeout" not in err  # abandoned once, not re-reported by the atexit pass


def test_save_from_an_atexit_handler_is_committed(tmp_path: Path) -> None:
    """A save made by an atexit handler (after the threading exit hook) still reaches the disk."""
    target = tmp_path / "late.pt"
    proc = _run(f"""
        import atexit, torch, torchaux
        torchaux.save_async(torch.zeros(1), {str(tmp_path / "early.pt")!r}).wait()
        atexit.register(lambda: torchaux.save_async({{"late": 1}}, {str(target)!r}))
    """)
    assert proc.returncode == 0, proc.stderr
    assert torch.load(target, weights_only=True) == {"late": 1}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_has_a_working_saver(tmp_path: Path) -> None:
    """After os.fork() with the writer running, the child saves, waits and exits normally."""
    proc = _run(f"""
        import os, sys, torch, torchaux
        torchaux.save_async(torch.ones(2), {str(tmp_path / "parent.pt")!r}).wait()
        pid = os.fork()
        if pid == 0:
            h = torchaux.save_async(torch.full((2,), 7.0), {str(tmp_path / "child.pt")!r})
            h.wait(timeout=60)
            sys.exit(0)  # a normal exit: the child's exit flush must not hang either
        _, status = os.waitpid(pid, 0)
        print("child status", os.waitstatus_to_exitcode(status))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "child status 0" in proc.stdout
    assert torch.load(tmp_path / "child.pt", weights_only=True).tolist() == [7.0, 7.0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_save_pending_at_fork_fails_clearly_in_the_child(tmp_path: Path) -> None:
    """A save the parent had in flight at fork is the parent's: in the child its handle fails at once."""
    proc = _run(f"""
        import contextlib, os, sys, threading, torch, torchaux
        from torchaux.checkpoint.storage.commit import atomic_write
        gate, entered = threading.Event(), threading.Event()
        @contextlib.contextmanager
        def gated(path):
            entered.set(); gate.wait(60)
            with atomic_write(path) as f:
                yield f
        saver = torchaux.AsyncSaver(sink=gated)
        h = torchaux.save_async(torch.ones(2), {str(tmp_path / "p.pt")!r}, saver=saver)
        entered.wait(60)
        pid = os.fork()
        if pid == 0:
            exc = h.exception(timeout=5)
            print("child:", type(exc).__name__, "forked" in str(exc), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        gate.set()
        print("parent:", h.wait(60) is not None)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "child: CheckpointError True" in proc.stdout
    assert "parent: True" in proc.stdout
