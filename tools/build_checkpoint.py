"""Write a synthetic checkpoint (real architecture, seeded random weights) to a folder.

python tools/build_checkpoint.py qwen3 OUT --size medium --dtype bfloat16 --max-shard-size 200MB
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lazystream.synthetic import SIZES, build_qwen3, build_zimage

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_SIZE = {"tiny": "200KB", "medium": "200MB", "real": "5GB"}


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv``, build the checkpoint, print status lines and the folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(SIZES))
    parser.add_argument("out", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--size", choices=["tiny", "medium", "real"], default="tiny")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--max-shard-size",
        help=f"e.g. 200MB, 5GB; default per size: {', '.join(f'{k} {v}' for k, v in DEFAULT_SHARD_SIZE.items())}",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tie-word-embeddings",
        action=argparse.BooleanOptionalAction,
        help="qwen3 only: tie lm_head to the input embeddings (default: the config's, untied)",
    )
    args = parser.parse_args(argv)
    if args.tie_word_embeddings is not None and args.family != "qwen3":
        parser.error("--tie-word-embeddings applies to qwen3 only")

    dtype = DTYPES[args.dtype]
    max_shard_size = args.max_shard_size or DEFAULT_SHARD_SIZE[args.size]
    progress = functools.partial(print, flush=True)
    start = time.perf_counter()
    if args.family == "qwen3":
        folder = build_qwen3(
            args.out,
            args.size,
            dtype=dtype,
            max_shard_size=max_shard_size,
            seed=args.seed,
            tie_word_embeddings=args.tie_word_embeddings,
            progress=progress,
        )
    else:
        folder = build_zimage(
            args.out, args.size, dtype=dtype, max_shard_size=max_shard_size, seed=args.seed, progress=progress
        )
    print(f"built {folder} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
