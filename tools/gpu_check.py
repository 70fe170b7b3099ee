"""The GPU check: one prepared run on the device machine (about 8 minutes).

    python tools/gpu_check.py [--out DIR] [--build qwen3:medium] [--dtype bfloat16] [BENCH ARGS...]

1. the CUDA tests (tests/test_cuda.py) with pytest;
2. ``lazystream bench`` on CUDA: every method and setting on a random-weight checkpoint
   built there (no network), with the floor's probes (pinned H2D, memcpy, cold reads).
Results go to DIR (default $OUT or /tmp): cuda_tests.log, bench.json, bench.md, bench.png.
diffusers is not on the device image: carry its wheel (see the device tool's README),
else the group-offloading rows say so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lazystream.bench import main as bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    parser.add_argument("--build", default="qwen3:medium")
    parser.add_argument("--dtype", default="bfloat16")
    args, rest = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                           capture_output=True, text=True)
    (args.out / "cuda_tests.log").write_text(tests.stdout + tests.stderr)
    print("cuda tests:", (tests.stdout.strip().splitlines() or [tests.stderr[-2000:]])[-1], flush=True)

    code = bench(["--device", "cuda", "--build", args.build, "--dtype", args.dtype, "--out", str(args.out), *rest])
    return tests.returncode or code


if __name__ == "__main__":
    sys.exit(main())
