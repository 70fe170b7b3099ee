"""The GPU check: one prepared run on the device machine.

    python tools/gpu_check.py [--out DIR] [--size medium] [--calls 10]

1. the CUDA tests (tests/test_cuda.py) with pytest;
2. a pinned host-to-device bandwidth probe (256 MiB, median of 5);
3. bench_forward on CUDA: library from_pretrained, all resident, half, none — forward
   time, device peak, stalls, copy GB/s — against the floor S / B_h2d.
Results go to DIR/gpu_check.json and DIR/gpu_check.md (DIR defaults to $OUT or /tmp).
diffusers is not on the device image: carry its wheel (see the device tool's README).
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def h2d_bandwidth(nbytes: int = 256 * 2**20, repeat: int = 5) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeat + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:]) / 1e9


def main() -> int:
    from bench_forward import run_settings, table

    from lazystream.synthetic import SIZES, build_qwen3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    parser.add_argument("--size", default="medium")
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(report, flush=True)

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                           capture_output=True, text=True)
    report["cuda_tests"] = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-2000:]
    (args.out / "cuda_tests.log").write_text(tests.stdout + tests.stderr)
    print("cuda tests:", report["cuda_tests"], flush=True)

    report["h2d_gb_per_s"] = h2d_bandwidth()
    print(f"pinned H2D {report['h2d_gb_per_s']:.1f} GB/s", flush=True)

    n_blocks = SIZES["qwen3"][args.size]["num_hidden_layers"]
    path = Path(f"/tmp/lazystream-gpu-qwen3-{args.size}")
    if not (path / "done").exists():
        build_qwen3(path, args.size, dtype=torch.bfloat16, max_shard_size="500MB")
        (path / "done").write_text("ok\n")
    results = run_settings(path, ["library", str(n_blocks), str(n_blocks // 2), "0"], "cuda", args.calls, 512)
    for r in results:
        if "streamed_bytes" in r:
            r["floor_s"] = r["streamed_bytes"] / (report["h2d_gb_per_s"] * 1e9)
    report["forward"] = results
    md = table(results, n_blocks)
    print(md, flush=True)
    (args.out / "gpu_check.md").write_text(f"{report['gpu']}, torch {report['torch']}, pinned H2D "
                                           f"{report['h2d_gb_per_s']:.1f} GB/s\n\n{md}\n")
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    return 0 if tests.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
