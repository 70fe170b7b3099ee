"""Read throughput from the page cache: the checkpoint layer against a plain numpy copy,
and lazystream's loader through its staging ring against the single-thread ring it
replaced, in one run.

    python tools/bench_read.py [--gb 1.0] [--repeat 5] [--json out.json] [--baseline PATH]

Builds (once, under /tmp) a float32 Qwen3 checkpoint of about --gb GB, reads every
shard once to put it in the page cache, then times, each --repeat times (median):
  grouped:  Checkpoint.read_into of every tensor into one host buffer (adjacent
            tensors coalesced into one copy per run);
  numpy:    np.copyto of each shard's data section from a numpy memmap into the same
            buffer;
  blocks:   the streaming pattern, each decoder block's tensors read into a reused
            buffer of the largest block's size.
and, each in a fresh process, the rounds interleaved (variant A, B, C, A, B, C, ...) so
that a busy spell of the machine hits them alike, the loader streaming every block into
two alternating block-sized host slots, all jobs submitted at once:
  ring:         IOConfig(staged=True): the ring sized from the block (reader threads,
                buffers), as lazystream uses it on CUDA;
  ring-1thread: one reader thread, two buffers of 64 MiB: the old ring's shape;
  unstaged:     IOConfig(staged=False): straight from the map into the slot (the CPU
                device's default);
  baseline:     with --baseline PATH (a checkout of an earlier lazystream, e.g.
                ``git worktree add /tmp/old <commit>``), IOConfig(staged=True) of that
                code: before the multi-threaded ring, one worker filling two 64 MiB
                buffers with torch copies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

LOADER_VARIANTS = {  # variant -> IOConfig keyword arguments
    "ring": {"staged": True},
    "ring-1thread": {"staged": True, "read_threads": 1, "staging_buffers": 2, "staging_bytes": 64 * 2**20},
    "unstaged": {"staged": False},
    "baseline": {"staged": True},
}


def checkpoint_of(gb: float) -> Path:
    from lazystream.synthetic import SIZES, build_qwen3

    size = dict(SIZES["qwen3"]["medium"])
    per_layer, fixed = 12.6e6 * 4, 65.5e6 * 4  # bytes of one medium layer, of the embeddings
    size["num_hidden_layers"] = max(1, round((gb * 1e9 - fixed) / per_layer))
    path = Path(f"/tmp/lazystream-bench-qwen3-{size['num_hidden_layers']}l")
    if not (path / "done").exists():
        build_qwen3(path, size, max_shard_size="200MB", progress=print)
        (path / "done").write_text("ok\n")
    return path


def warm(paths: list[Path]) -> None:
    buf = bytearray(64 * 2**20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def median_gbps(fn, nbytes: int, repeat: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9, times


def block_items(ckpt) -> list[list]:
    """Per decoder block (and one group of everything else): (record, offset in the block)."""
    blocks: dict[str, list] = {}
    for rec in sorted(ckpt.values(), key=lambda r: (str(r.file), r.offset)):
        parts = rec.name.split(".")
        key = ".".join(parts[:3]) if rec.name.startswith("model.layers.") else "other"
        blocks.setdefault(key, []).append(rec)
    out = []
    for recs in blocks.values():
        off, its = 0, []
        for rec in recs:
            its.append((rec, off))
            off += rec.nbytes
        out.append(its)
    return out


def loader_child(folder: str, variant: str, passes: int) -> dict:
    """In a process of its own (with the lazystream on sys.path, the baseline's too): the
    seconds of ``passes`` passes streaming every decoder block through the loader. Uses
    only API that every lazystream since the staging ring had."""
    from lazystream import Checkpoint, IOConfig
    from lazystream.checkpoint import coalesce
    from lazystream.devices import HostDevice
    from lazystream.io import Loader

    ckpt = Checkpoint.open(folder)
    warm(ckpt.shard_paths)
    jobs = [coalesce(its) for its in block_items(ckpt) if its[0][0].name.startswith("model.layers.")]
    size = max(max(r.dest_offset + r.nbytes for r in runs) for runs in jobs)
    slots = [torch.zeros(size, dtype=torch.uint8) for _ in range(2)]  # touched: no page faults timed
    loader = Loader(ckpt, HostDevice(torch.device("cpu")), IOConfig(**LOADER_VARIANTS[variant]))
    nbytes = sum(r.nbytes for runs in jobs for r in runs)

    def stream() -> None:
        tickets = [loader.submit(runs, slots[i % 2]) for i, runs in enumerate(jobs)]
        for ticket in tickets:
            ticket.wait()

    stream()  # warm-up: the ring's allocation and threads
    seconds = []
    for _ in range(passes):
        start = time.perf_counter()
        stream()
        seconds.append(time.perf_counter() - start)
    staging = loader.staging_bytes
    loader.close()
    ckpt.close()
    return {"bytes": nbytes, "seconds": seconds, "staging_bytes": staging}


def run_loader_variants(folder: Path, repeat: int, baseline: Path | None) -> dict:
    variants = [v for v in LOADER_VARIANTS if v != "baseline" or baseline]
    found: dict[str, dict] = {v: {"seconds": []} for v in variants}
    for _ in range(repeat):
        for variant in variants:
            tree = baseline if variant == "baseline" else ROOT
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
            run = subprocess.run([sys.executable, __file__, "--child", str(folder), variant], env=env,
                                 capture_output=True, text=True, timeout=600)
            if run.returncode != 0:
                raise RuntimeError(f"{variant} failed:\n{run.stderr[-3000:]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            found[variant]["seconds"] += result["seconds"]
            found[variant].update(bytes=result["bytes"], staging_bytes=result["staging_bytes"])
    for row in found.values():
        rates = sorted(row["bytes"] / s / 1e9 for s in row["seconds"])
        row.update(gb_per_s=statistics.median(rates), low=rates[0], high=rates[-1])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--baseline", type=Path, help="a checkout of an earlier lazystream to compare the loader with")
    parser.add_argument("--child", nargs=2, metavar=("CHECKPOINT", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(loader_child(args.child[0], args.child[1], passes=3)))
        return

    sys.path.insert(0, str(ROOT))
    from lazystream import Checkpoint
    from lazystream.checkpoint import coalesce
    from lazystream.header import read_header

    folder = checkpoint_of(args.gb)
    ckpt = Checkpoint.open(folder)
    shards = ckpt.shard_paths
    warm(shards)
    records = sorted(ckpt.values(), key=lambda r: (str(r.file), r.offset))
    items, end = [], 0
    for rec in records:
        items.append((rec, end))
        end += rec.nbytes
    dest = torch.zeros(end, dtype=torch.uint8)  # touched: page faults are not timed
    runs = coalesce(items)

    def grouped() -> None:
        ckpt.read_into(items, dest)

    spans, at = [], 0
    for path in sorted(shards, key=str):
        header = read_header(path)
        n = header.file_size - header.data_start
        spans.append((np.memmap(path, dtype=np.uint8, mode="r", offset=header.data_start, shape=(n,)), at, n))
        at += n
    dest_np = dest.numpy()

    def numpy_copy() -> None:
        for mm, start, n in spans:
            np.copyto(dest_np[start:start + n], mm)

    blocks = block_items(ckpt)
    slot = torch.zeros(max(sum(r.nbytes for r, _ in its) for its in blocks), dtype=torch.uint8)

    def per_block() -> None:
        for its in blocks:
            ckpt.read_into(its, slot)

    nbytes = ckpt.nbytes
    rows = {}
    for name, fn in (("numpy", numpy_copy), ("grouped", grouped), ("blocks", per_block)):
        fn()  # warm-up
        gbps, times = median_gbps(fn, nbytes, args.repeat)
        rows[name] = {"gb_per_s": gbps, "seconds": times}
    ckpt.close()
    del dest, spans
    loaders = run_loader_variants(folder, args.repeat, args.baseline)
    result = {"bytes": nbytes, "shards": len(shards), "tensors": len(records), "copy_runs": len(runs),
              "torch_threads": torch.get_num_threads(), "cores": os.cpu_count(), **rows,
              "loader": loaders, "baseline": str(args.baseline) if args.baseline else None}
    print(f"{nbytes / 1e9:.2f} GB in {len(shards)} shards, {len(records)} tensors -> {len(runs)} coalesced copies; "
          f"torch threads {torch.get_num_threads()}")
    print("| method | GB/s (median) | ratio to numpy |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['gb_per_s']:.2f} | {row['gb_per_s'] / rows['numpy']['gb_per_s']:.2f} |")
    print(f"\nloader, every decoder block into two alternating slots, {args.repeat} processes x 3 passes each:")
    print("| loader | GB/s, median (range) | staging MiB |\n|---|---|---|")
    for name, row in loaders.items():
        print(f"| {name} | {row['gb_per_s']:.2f} ({row['low']:.2f}–{row['high']:.2f}) | "
              f"{row['staging_bytes'] / 2**20:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
