"""Grouped-read throughput of the checkpoint layer against a plain numpy copy of the
same bytes, from the page cache, in one run.

    python tools/bench_read.py [--gb 1.0] [--repeat 5] [--json out.json]

Builds (once, under /tmp) a float32 Qwen3 checkpoint of about --gb GB, reads every
shard once to put it in the page cache, then times, each --repeat times (median):
  grouped:  Checkpoint.read_into of every tensor into one host buffer (adjacent
            tensors coalesced into one copy per run);
  numpy:    np.copyto of each shard's data section from a numpy memmap into the same
            buffer;
  blocks:   the streaming pattern, each decoder block's tensors read into a reused
            buffer of the largest block's size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazystream import Checkpoint  # noqa: E402
from lazystream.checkpoint import coalesce  # noqa: E402
from lazystream.header import read_header  # noqa: E402
from lazystream.synthetic import SIZES, build_qwen3  # noqa: E402


def checkpoint_of(gb: float) -> Path:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    ckpt = Checkpoint.open(checkpoint_of(args.gb))
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

    blocks: dict[str, list] = {}
    for rec in records:
        parts = rec.name.split(".")
        key = ".".join(parts[:3]) if rec.name.startswith("model.layers.") else "other"
        blocks.setdefault(key, []).append(rec)
    block_items = []
    for recs in blocks.values():
        off, its = 0, []
        for rec in recs:
            its.append((rec, off))
            off += rec.nbytes
        block_items.append(its)
    slot = torch.zeros(max(sum(r.nbytes for r, _ in its) for its in block_items), dtype=torch.uint8)

    def per_block() -> None:
        for its in block_items:
            ckpt.read_into(its, slot)

    nbytes = ckpt.nbytes
    rows = {}
    for name, fn in (("numpy", numpy_copy), ("grouped", grouped), ("blocks", per_block)):
        fn()  # warm-up
        gbps, times = median_gbps(fn, nbytes, args.repeat)
        rows[name] = {"gb_per_s": gbps, "seconds": times}
    result = {"bytes": nbytes, "shards": len(shards), "tensors": len(records), "copy_runs": len(runs),
              "torch_threads": torch.get_num_threads(), **rows}
    print(f"{nbytes / 1e9:.2f} GB in {len(shards)} shards, {len(records)} tensors -> {len(runs)} coalesced copies; "
          f"torch threads {torch.get_num_threads()}")
    print("| method | GB/s (median) | ratio to numpy |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['gb_per_s']:.2f} | {row['gb_per_s'] / rows['numpy']['gb_per_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    ckpt.close()


if __name__ == "__main__":
    main()
