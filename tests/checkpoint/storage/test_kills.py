"""SIGKILL at seeded random moments, on every save path: 0 torn files.

A server process imports torch once and forks one saver child per kill (a
fresh interpreter per kill would spend its time importing torch); the child
saves ever-increasing steps to one path and reports each commit on a pipe;
the server kills the child's whole process group (the process saver's writer
included) at a random moment and checks the file: it loads, every tensor
holds one single step, and that step is not older than the last commit the
child reported.  ``TORCHAUX_TEST_KILLS`` sets the kills per path (default 100
in the slow run; the default run does a few per path).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"),
                       reason="needs fork and SIGKILL"),
]

SEED = 20261202
PATHS = ["save_async", "save_checkpoint thread AES-GCM", "save_checkpoint process",
         "save_checkpoint safetensors CRC"]
#: The uploader: the object appears only once its multipart upload completes.
S3_PATHS = ["save_async s3"]

SERVER = textwrap.dedent(
    r"""
    import json, os, random, signal, sys, time
    import torch, torchaux
    torch.set_num_threads(1)  # no intra-op pool in the parent: forking stays safe

    which, directory, kills, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    # For S3: the directory is an s3:// URL and the fsspec options come as JSON.
    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
    # A process-saver child first starts its writer process (an interpreter and
    # torch's import, seconds here): kills must also land after that.
    max_delay = 4.0 if "process" in which else 0.4
    KEY = bytes(range(32))
    ext = ".safetensors" if "safetensors" in which else ".ckpt"
    path = directory + "/ckpt" + ext if "s3" in which else os.path.join(directory, "ckpt" + ext)

    def save(state):
        if which == "save_async":
            torchaux.save_async(state, path).wait()
        elif which == "save_async s3":
            torchaux.save_async(state, path, storage_options=options).wait()
        elif which == "save_checkpoint thread AES-GCM":
            torchaux.save_checkpoint(state, path, enc_key=KEY, async_save="thread").wait()
        elif which == "save_checkpoint process":
            torchaux.save_checkpoint(state, path, crc_check=True, async_save="process").wait()
        else:
            torchaux.save_checkpoint(state, path, format="safetensors", crc_check=True)

    def load():
        if which == "save_async":
            return torch.load(path, weights_only=True)
        if which == "save_async s3":
            return torchaux.load_checkpoint(path, storage_options=options)
        key = KEY if "AES" in which else None
        return torchaux.load_checkpoint(path, dec_key=key, crc_check="CRC" in which or "process" in which)

    def child(step, wfd):
        os.setpgid(0, 0)
        n = 1 << 19  # 2 MiB per tensor
        state = {"a": torch.empty(n), "b": torch.empty(n // 2, dtype=torch.float64),
                 "step": torch.tensor(-1)}
        while True:
            for k in ("a", "b"):
                state[k].fill_(step)
            state["step"] = torch.tensor(step)
            os.write(wfd, f"s {step}\n".encode())
            save(state)
            os.write(wfd, f"c {step}\n".encode())
            step += 1

    def main():
        step, last_committed, torn, results = 0, -1, [], []
        rng = random.Random(seed)
        for kill in range(kills):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    child(step, w)
                finally:
                    os._exit(1)
            os.close(w)
            reader = os.fdopen(r)
            lines = []
            if kill == 0:  # the file must exist before the first kill
                while not (lines and lines[-1].startswith("c ")):
                    lines.append(reader.readline())
                    if not lines[-1]:
                        raise SystemExit("the saver child died before its first commit")
            time.sleep(rng.uniform(0.0, max_delay))
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            lines += reader.read().splitlines()
            reader.close()
            saving = [int(l.split()[1]) for l in lines if l.startswith("s ")]
            committed = [int(l.split()[1]) for l in lines if l.startswith("c ")]
            last_committed = max(committed, default=last_committed)
            try:
                state = load()
                got = int(state["step"])
                mixed = [k for k in ("a", "b") if not bool((state[k] == got).all())]
            except Exception as exc:  # a torn file: report it, never hide it
                torn.append(f"kill {kill}: does not load: {exc!r}")
                break
            if mixed or not (last_committed <= got <= max(saving, default=got)):
                torn.append(f"kill {kill}: step {got}, mixed {mixed}, last committed {last_committed}")
            step = max(saving, default=step) + 1
            results.append(got)
        print(json.dumps({"kills": len(results), "torn": torn, "last": results[-1:]}))

    if __name__ == "__main__":  # the process saver's writer must not re-run this
        main()
    """
)


def _kills(slow: bool) -> int:
    return int(os.environ.get("TORCHAUX_TEST_KILLS", "100" if slow else "3"))


def _run(tmp_path: Path, which: str, kills: int, bucket: Any = None) -> dict:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    if bucket is None:
        directory, extra = tmp_path / "ckpt", []
        directory.mkdir()
    else:
        directory, extra = bucket.url("run"), [json.dumps(bucket.storage_options)]
    proc = subprocess.run(
        [sys.executable, str(script), which, str(directory), str(kills), str(SEED), *extra],
        capture_output=True, text=True, timeout=120 + 8 * kills, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("which", PATHS)
def test_a_few_kills_per_path(tmp_path: Path, which: str) -> None:
    """A few seeded SIGKILLs per save path leave a loadable, single-step, never-older file."""
    result = _run(tmp_path, which, _kills(slow=False))
    assert result["torn"] == []
    assert result["kills"] == _kills(slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("which", PATHS)
def test_a_hundred_kills_per_path(tmp_path: Path, which: str) -> None:
    """100 seeded SIGKILLs per save path (TORCHAUX_TEST_KILLS): 0 torn."""
    result = _run(tmp_path, which, _kills(slow=True))
    assert result["torn"] == []
    assert result["kills"] == _kills(slow=True)


def _no_upload_left(bucket: Any) -> None:
    """A killed upload never shows: only the committed object is listed."""
    assert bucket.keys() == ["run/ckpt.ckpt"], bucket.keys()


@pytest.mark.parametrize("which", S3_PATHS)
def test_a_few_kills_of_the_uploader(tmp_path: Path, s3_bucket: Any, which: str) -> None:
    """SIGKILL of a save to the local S3 server: the object is the previous or the new step, whole."""
    result = _run(tmp_path, which, _kills(slow=False), s3_bucket)
    assert result["torn"] == []
    assert result["kills"] == _kills(slow=False)
    _no_upload_left(s3_bucket)


@pytest.mark.slow
@pytest.mark.parametrize("which", S3_PATHS)
def test_a_hundred_kills_of_the_uploader(tmp_path: Path, s3_bucket: Any, which: str) -> None:
    """100 seeded SIGKILLs of the S3 uploader (TORCHAUX_TEST_KILLS): 0 torn."""
    result = _run(tmp_path, which, _kills(slow=True), s3_bucket)
    assert result["torn"] == []
    assert result["kills"] == _kills(slow=True)
    _no_upload_left(s3_bucket)
