"""What a checkpoint costs against a local S3 server (`moto_server` on loopback).

A ~500 MB state (fp32 parameters of a module, as a model's weights would be) is saved through the
real path, `trainer.checkpoint.CheckpointIO` (DCP over fsspec/s3fs, hashing every byte, manifest
written last), and compared with two baselines measured in the same run:

1. Save throughput: the same number of bytes uploaded by plain s3fs, split into as many objects as
   DCP writes and uploaded by as many threads (`checkpoint.io_threads`). Ratio = raw seconds /
   checkpoint seconds (1.0: the checkpoint adds nothing to the transfer; the issue aims at >= 0.9).
2. Blocked time: how long the training thread waits in an async save (staging a copy to host
   memory) against a sync save (the whole write). Ratio = async / sync (aim <= 0.05).

Each side runs --repeats times alternately; medians are printed. The moto server keeps objects
in memory, so each save's objects are deleted before the next.

    python bench/checkpoint.py [--mb 512] [--threads 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import fsspec
import torch

from trainer.checkpoint import CheckpointIO

BUCKET = "bench"


def start_moto() -> tuple[subprocess.Popen, str]:
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = open(os.path.join(tempfile.gettempdir(), "bench-moto.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")).close()
    return proc, endpoint


def make_module(megabytes: int) -> torch.nn.Module:
    """Parameters of 8 MiB each, `megabytes` in all."""
    module = torch.nn.Module()
    per = 2 * 2**20  # fp32 values per parameter: 8 MiB
    for i in range(max(1, megabytes // 8)):
        module.register_parameter(f"p{i:03d}", torch.nn.Parameter(torch.randn(per)))
    return module


def checkpoint_save(io: CheckpointIO, module: torch.nn.Module, url: str,
                    blocking: bool) -> tuple[float, float, int]:
    start = time.perf_counter()
    pending = io.save(module, [], {"global_step": 0}, url, 0, blocking=blocking)
    result = pending.wait()
    if not result.ok:
        raise RuntimeError(result.error)
    return time.perf_counter() - start, result.blocked_seconds, result.nbytes


def raw_upload(fs, prefix: str, nbytes: int, pieces: int) -> float:
    """The same bytes, as `pieces` objects uploaded by `pieces` threads with s3fs."""
    size = nbytes // pieces
    blobs = [os.urandom(1024) * (size // 1024) for _ in range(pieces)]
    start = time.perf_counter()
    with ThreadPoolExecutor(pieces) as pool:
        list(pool.map(lambda i: fs.pipe_file(f"{prefix}/raw-{i}", blobs[i]), range(pieces)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    proc, endpoint = start_moto()
    options = {"endpoint_url": endpoint}
    fs = fsspec.filesystem("s3", **options)
    try:
        module = make_module(args.mb)
        io = CheckpointIO(options, io_threads=args.threads)
        sync_s, async_total, async_blocked, raw_s = [], [], [], []
        nbytes = 0
        for i in range(args.repeats):
            seconds, _, nbytes = checkpoint_save(io, module, f"s3://{BUCKET}/sync-{i}",
                                                 blocking=True)
            sync_s.append(seconds)
            fs.rm(f"{BUCKET}/sync-{i}", recursive=True)
            raw_s.append(raw_upload(fs, f"{BUCKET}/raw-{i}", nbytes, args.threads))
            fs.rm(f"{BUCKET}/raw-{i}", recursive=True)
            total, blocked, _ = checkpoint_save(io, module, f"s3://{BUCKET}/async-{i}",
                                                blocking=False)
            async_total.append(total)
            async_blocked.append(blocked)
            fs.rm(f"{BUCKET}/async-{i}", recursive=True)
            fs.invalidate_cache()
        med = statistics.median
        mib = nbytes / 2**20
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {args.repeats} repeats, medians")
        print(f"state: {mib:.0f} MiB in {args.threads} DCP files (1 rank, io_threads="
              f"{args.threads}) to moto_server on 127.0.0.1")
        print(f"raw s3fs upload, {args.threads} objects x {args.threads} threads: "
              f"{med(raw_s):.2f} s ({mib / med(raw_s):.0f} MiB/s)")
        print(f"checkpoint sync save (hash + manifest): {med(sync_s):.2f} s "
              f"({mib / med(sync_s):.0f} MiB/s)")
        print(f"save throughput ratio (raw s / checkpoint s): {med(raw_s) / med(sync_s):.2f}")
        print(f"async save: training blocked {med(async_blocked):.3f} s of "
              f"{med(async_total):.2f} s; sync blocked {med(sync_s):.2f} s")
        print(f"blocked ratio (async / sync): {med(async_blocked) / med(sync_s):.3f}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


if __name__ == "__main__":
    main()
