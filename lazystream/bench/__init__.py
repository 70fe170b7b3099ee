"""``lazystream bench``: lazystream and every offloader a user would pick instead, on one
checkpoint with the same inputs on the same device, each in its own process, against
the hardware floor measured in the same run.

    lazystream bench [CHECKPOINT] [--build qwen3:medium] [--dtype float32] [--device cpu]
                     [--calls 5] [--tokens 32] [--only REGEX] [--out DIR] [--quick]

CHECKPOINT is a folder or a Hugging Face repo id; without one, the checkpoint builders
make one (``--build FAMILY:SIZE``, SIZE a preset of lazystream.synthetic.SIZES or a JSON
object of overrides; built once under --work). Methods (lazystream.bench.runs): the
library's own model resident; lazystream at 0, 1/4, 1/2, 3/4 and all of the blocks,
placement first/spread, io mmap/direct, and at 0 with the page cache evicted before
every call (cold); transformers/diffusers device_map keeping the same blocks with the
rest on the CPU or on disk; accelerate cpu_offload; diffusers group offloading
(block/leaf level, streams on/off, disk); the first-N-resident-then-sequential mixin.
Methods that mean nothing without CUDA are listed as "needs CUDA" on the CPU.

Writes DIR/bench.json (every figure), DIR/bench.md (the table, the targets, the
comparisons) and DIR/bench.png (forward time against device memory; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

# Only the parser lives here: 'lazystream bench --help' and a bad option answer without
# importing torch; the benchmark is lazystream.bench.suite.
DTYPE_NAMES = ("bfloat16", "float16", "float32")
FAMILIES = ("qwen3", "zimage")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; ``argv`` as on the command line (without the program name)."""
    args = _parser().parse_args(argv)
    from .suite import run

    return run(args, argv)


def _parser() -> argparse.ArgumentParser:
    from ..cli import OneLineErrorParser

    p = OneLineErrorParser(prog="lazystream bench", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="folder or hub repo id (default: build one, see --build)")
    p.add_argument("--build", default="qwen3:medium", type=_build_spec,
                   help="FAMILY:SIZE to build without a checkpoint (qwen3, zimage; SIZE a preset or a JSON object)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="dtype of a built checkpoint")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--calls", type=int, default=5, help="timed forwards per run, after one warm-up")
    p.add_argument("--tokens", type=int, help="tokens per forward of a causal LM (default 32 on CPU, 512 on CUDA)")
    p.add_argument("--only", help="run only the methods whose label matches this regex (and resident)")
    p.add_argument("--out", default="lazystream-bench", help="folder for bench.json, bench.md, bench.png")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lazystream-bench"),
                   help="folder for built checkpoints and offload scratch (the disk the checkpoint is read from)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure each run in this many fresh processes (median of their medians)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    p.add_argument("--settle", type=float, default=0,
                   help="on a shared machine: before each run, wait up to this many seconds for other processes to "
                   "leave the CPUs idle, and run it again if they did not")
    p.add_argument("--quick", action="store_true", help="smoke run: a tiny checkpoint and fewer settings")
    p.add_argument("--in-process", action="store_true",
                   help="run every method in this process (tests, debugging: host memory figures then mix)")
    return p


def _build_spec(text: str) -> str:
    """``FAMILY:SIZE``, checked before anything is built (the presets need torch: looked up then)."""
    family, _, size = text.partition(":")
    if family not in FAMILIES:
        raise argparse.ArgumentTypeError(f"expected FAMILY:SIZE with FAMILY one of {list(FAMILIES)}, got {text!r}")
    if size.startswith("{"):
        try:
            json.loads(size)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"SIZE of {text!r} is not a JSON object: {exc}") from None
    elif size:
        from ..synthetic import SIZES

        if size not in SIZES[family]:
            raise argparse.ArgumentTypeError(f"SIZE of {text!r} must be one of {sorted(SIZES[family])} or a JSON "
                                             "object of overrides")
    return text
