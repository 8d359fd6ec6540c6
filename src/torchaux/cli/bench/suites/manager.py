"""``torchaux bench --manager``: what a CheckpointManager adds to a save, locally and on S3.

Three ratios, each from paired measurements in one run (alternating order,
medians), so machine noise cancels (issue #10's bars):

1. caller stall of ``CheckpointManager.save`` / bare ``save_async`` (local);
2. caller stall of a manager on S3 / a manager on the local disk;
3. upload throughput of ``save_async(state, "s3://...")`` (call to committed)
   / ``s3fs``'s own ``put_file`` of the same bytes from a local file, plus the
   peak resident memory the upload adds beyond the warm staging buffers.

The S3 server is moto's (``moto[server]``, a test dependency) started as a
separate process on 127.0.0.1, so its CPU use does not share the client's GIL;
it stands in for a real endpoint, which ``--s3-endpoint`` can name instead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from torchaux.cli.bench.measure import RssSampler

__all__ = ["run_manager_bench", "format_manager_report"]

_MIB = 1 << 20


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in a child process on a free 127.0.0.1 port; yields its endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the moto S3 server did not start; pip install 'moto[server]'")
            time.sleep(0.05)  # polling a child's port: no event to wait on
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def _options(endpoint: str) -> dict[str, Any]:
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def _paired(rounds: int, a: Callable[[int], float], b: Callable[[int], float]) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, alternating which runs first each round."""
    ta, tb = [], []
    for i in range(rounds):
        if i % 2 == 0:
            ta.append(a(i))
            tb.append(b(i))
        else:
            tb.append(b(i))
            ta.append(a(i))
    return statistics.median(ta), statistics.median(tb)


def _bare(state: dict[str, Any], target: Callable[[int], str], saver: Any) -> Callable[[int], float]:
    import torchaux

    def run(i: int) -> float:
        stall, handle = _timed(lambda: torchaux.save_async(state, target(i), saver=saver))
        handle.wait()
        return stall

    return run


def _managed(state: dict[str, Any], manager: Any) -> Callable[[int], float]:
    def run(_i: int) -> float:
        step = (manager.latest_step() or 0) + 1  # outside the timed call
        stall, handle = _timed(lambda: manager.save(step, state))
        handle.wait()
        manager.wait_until_finished()  # retention and pointer: not in the next round's time
        return stall

    return run


def _stalls(rounds: int, a: Callable[[int], float], b: Callable[[int], float]) -> tuple[float, float]:
    a(0), b(0)  # warm both paths (buffers, threads, connections)
    return _paired(rounds, a, b)


def run_manager_bench(
    *, size_mib: int = 256, rounds: int = 11, upload_rounds: int = 3,
    directory: str | None = None, s3_endpoint: str | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Measure the three ratios above; returns the numbers (seconds, bytes/s, bytes)."""
    import s3fs

    import torchaux

    state = {"w": torch.randn(size_mib * _MIB // 4), "step": 0}
    nbytes = state["w"].numel() * 4
    out: dict[str, Any] = {"size_mib": size_mib, "rounds": rounds, "upload_rounds": upload_rounds}
    with contextlib.ExitStack() as stack:
        root = directory or stack.enter_context(tempfile.TemporaryDirectory(prefix="torchaux-bench-"))
        endpoint = s3_endpoint or stack.enter_context(moto_server())
        opts = _options(endpoint)
        fs = s3fs.S3FileSystem(**opts)
        bucket = f"torchaux-bench-{secrets.token_hex(4)}"
        fs.mkdir(bucket)
        saver = torchaux.AsyncSaver()
        stack.callback(saver.close)

        log("stall: manager vs bare save_async (local)")
        mgr = torchaux.CheckpointManager(os.path.join(root, "run"), keep_latest=2)
        stack.callback(mgr.close)
        bare_s, mgr_s = _stalls(
            rounds, _bare(state, lambda i: os.path.join(root, f"bare-{i % 2}.pt"), saver),
            _managed(state, mgr),
        )
        out.update(bare_stall_s=bare_s, manager_stall_s=mgr_s, manager_stall_ratio=mgr_s / bare_s)

        log("stall: manager on S3 vs manager on the local disk")
        mgr_s3 = torchaux.CheckpointManager(f"s3://{bucket}/run", keep_latest=2, storage_options=opts)
        stack.callback(mgr_s3.close)
        local_mgr_s, s3_s = _stalls(rounds, _managed(state, mgr), _managed(state, mgr_s3))
        out.update(s3_manager_stall_s=s3_s, s3_paired_local_manager_stall_s=local_mgr_s,
                   s3_stall_ratio_vs_local_manager=s3_s / local_mgr_s)

        log("upload: save_async to S3 vs s3fs put_file of the same bytes")
        local_file = os.path.join(root, "payload.bin")
        with open(local_file, "wb") as f:
            f.write(memoryview(state["w"].numpy()).cast("B"))
        file_bytes = os.path.getsize(local_file)
        peaks: list[int] = []

        def ours(i: int) -> float:
            url = f"s3://{bucket}/ours-{i}.pt"
            with RssSampler() as rss:
                elapsed, _ = _timed(lambda: torchaux.save_async(
                    state, url, saver=saver, storage_options=opts).wait())
            peaks.append(rss.peak - rss.base)
            return elapsed

        def put(i: int) -> float:
            return _timed(lambda: fs.put_file(local_file, f"{bucket}/put-{i}.bin"))[0]

        ours(-1)  # warm: staging buffers and part buffers exist from here on
        peaks.clear()
        ours_s, put_s = _paired(upload_rounds, ours, put)
        out.update(
            upload_bytes=nbytes, put_file_bytes=file_bytes, ours_upload_s=ours_s,
            put_file_s=put_s, ours_upload_MBps=nbytes / ours_s / 1e6,
            put_file_MBps=file_bytes / put_s / 1e6, upload_throughput_ratio=put_s / ours_s,
            upload_extra_rss_peak_bytes=max(peaks),
        )
        from torchaux import _knobs

        out["part_buffers_bytes"] = (_knobs.upload_concurrency() + 1) * _knobs.upload_part_bytes()
        fs.rm(bucket, recursive=True)
    return out


def format_manager_report(r: dict[str, Any]) -> str:
    """The measurements as a short table."""
    ms = 1e3
    return "\n".join([
        f"state {r['size_mib']} MiB; stall medians of {r['rounds']} paired rounds, "
        f"upload medians of {r['upload_rounds']}",
        f"caller stall  bare save_async      {r['bare_stall_s'] * ms:8.1f} ms",
        f"caller stall  CheckpointManager    {r['manager_stall_s'] * ms:8.1f} ms   "
        f"ratio {r['manager_stall_ratio']:.3f}  (bar <= 1.1)",
        f"caller stall  manager on S3        {r['s3_manager_stall_s'] * ms:8.1f} ms   "
        f"ratio vs local manager {r['s3_stall_ratio_vs_local_manager']:.3f}",
        f"upload        s3fs put_file        {r['put_file_MBps']:8.1f} MB/s",
        f"upload        save_async(s3://)    {r['ours_upload_MBps']:8.1f} MB/s   "
        f"ratio {r['upload_throughput_ratio']:.3f}  (bar >= 0.8)",
        f"upload        extra RSS peak       {r['upload_extra_rss_peak_bytes'] / _MIB:8.1f} MiB "
        f"(part buffers {r['part_buffers_bytes'] / _MIB:.0f} MiB)",
    ])
