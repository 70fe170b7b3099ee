"""Pieces per second the loader's issue path sustains (cut a job into pieces, hand each
to a reader, fill it, issue its copy in order), against what PCIe 5 needs at the ring's
piece sizes.

    PYTHONPATH=$PWD python tools/bench_issue.py [--pieces 4096] [--repeat 5]

Tiny pieces (4 KiB), so the cost measured is the per-piece Python and locking, not the
bytes: on the CPU device (copies synchronous: the library's path alone) and on the async
device with no delay (copies queued to its copy-stream thread, as on CUDA; its queue and
events cost more than CUDA's calls would leave to Python). Median of --repeat runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

PCIE5 = 55e9  # bytes/s of a PCIe 5 x16 link, pinned host to device
PIECE = 4096


def build(folder: Path, nbytes: int) -> Path:
    from safetensors.torch import save_file

    save_file({"w": torch.randint(0, 256, (nbytes,), dtype=torch.uint8)}, folder / "model.safetensors")
    return folder


def rate(folder: Path, ops, pieces: int, threads: int) -> float:
    from lazystream.checkpoint import Checkpoint, CopyRun
    from lazystream.io import IOConfig, Loader

    ckpt = Checkpoint.open(folder)
    loader = Loader(ckpt, ops, IOConfig(staged=True, staging_bytes=PIECE, staging_buffers=4 * threads,
                                        read_threads=threads))
    dest = ops.empty(pieces * PIECE)
    record = ckpt["w"]
    runs = [CopyRun(record.file, record.offset, 0, pieces * PIECE)]
    loader.allocate(dest.numel())
    loader.submit(runs, dest).wait()  # warm: threads started
    loader.drain()
    start = time.perf_counter()
    ticket = loader.submit(runs, dest)
    ticket.wait()
    ops.host_waits_for(ticket.ready)
    seconds = time.perf_counter() - start
    loader.close()
    ckpt.close()
    return pieces / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from lazystream.async_device import AsyncDevice
    from lazystream.devices import HostDevice

    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp), args.pieces * PIECE)
        for name, make in (("cpu", lambda: HostDevice(cpu)), ("async", lambda: AsyncDevice(cpu, delay="0", lag="0"))):
            rates = [rate(folder, make(), args.pieces, args.threads) for _ in range(args.repeat)]
            median = statistics.median(rates)
            print(f"{name}: {median:,.0f} pieces/s ({1e6 / median:.1f} us per piece), {args.threads} reader threads, "
                  f"{args.pieces} pieces, median of {args.repeat}")
    print("PCIe 5 (55 GB/s) needs: " + ", ".join(f"{mib} MiB pieces {PCIE5 / (mib * 2**20):,.0f}/s"
                                                  for mib in (1, 2, 4, 16)))


if __name__ == "__main__":
    main()
