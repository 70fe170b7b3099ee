"""Forward time and host memory of a streamed Qwen3 against resident, one process per
setting, in one run.

    python tools/bench_forward.py [--size medium] [--device cpu] [--calls 5] [--tokens 32] [--json out.json]

Builds (once, under /tmp) a float32 Qwen3 checkpoint of the --size preset (medium is
about 1.5 GB), then for each setting — the library's own from_pretrained, lazystream with
every block resident, half, and none — loads it in a fresh process, runs one warm-up
forward and --calls timed forwards on a batch of --tokens tokens, and reports the median
(and range) forward time, the load time, the peak growth of anonymous RSS over load and
forwards, and the streamer's stats.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = r"""
import json, statistics, sys, time
import torch
from transformers import Qwen3ForCausalLM
from lazystream import LazyStreamModel, streamer_of
from lazystream.telemetry import PeakRssAnon

path, setting, device, calls, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
dev = torch.device(device)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(0)).to(dev)
torch.ones(1) @ torch.ones(1)
with PeakRssAnon() as rss:
    start = time.perf_counter()
    if setting == "library":
        model = Qwen3ForCausalLM.from_pretrained(path, dtype="auto").to(dev).eval()
    else:
        model = LazyStreamModel.from_pretrained(path, int(setting), device=dev)
    sync()
    load = time.perf_counter() - start
    times = []
    with torch.no_grad():
        for i in range(calls + 1):
            start = time.perf_counter()
            model(ids)
            sync()
            times.append(time.perf_counter() - start)
out = {"setting": setting, "load_s": load, "forward_s": times[1:], "median_s": statistics.median(times[1:]),
       "host_anon_peak_growth": rss.growth}
if setting != "library":
    s = streamer_of(model)
    st = s.stats()
    out.update(streamed_bytes=s.plan.streamed_bytes, device_bytes=s.plan.device_bytes,
               stall_s=st.last_call.stall_seconds, stalls=st.last_call.stalls, copy_gb_per_s=st.last_call.gb_per_s)
if dev.type == "cuda":
    out["device_peak"] = torch.cuda.max_memory_allocated(dev)
print(json.dumps(out))
"""


def run_settings(path: Path, settings: list[str], device: str, calls: int, tokens: int) -> list[dict]:
    results = []
    for setting in settings:
        run = subprocess.run([sys.executable, "-c", CHILD, str(path), setting, device, str(calls), str(tokens)],
                             capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"setting {setting} failed:\n{run.stderr[-3000:]}")
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    return results


def table(results: list[dict], n_blocks: int) -> str:
    mib = 2**20
    base = next(r for r in results if r["setting"] == str(n_blocks))["median_s"]
    lines = ["| setting | load s | forward ms median (range) | x resident | streamed MiB/call | stall ms | "
             "copy GB/s | host anon peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = "library from_pretrained" if r["setting"] == "library" else f"keep_gpu={r['setting']}"
        lines.append(
            f"| {name} | {r['load_s']:.2f} | {r['median_s'] * 1e3:.0f} ({min(r['forward_s']) * 1e3:.0f}–"
            f"{max(r['forward_s']) * 1e3:.0f}) | {r['median_s'] / base:.2f} | "
            f"{r.get('streamed_bytes', 0) / mib:.0f} | {r.get('stall_s', 0) * 1e3:.1f} | "
            f"{r.get('copy_gb_per_s', 0):.2f} | {r['host_anon_peak_growth'] / mib:.0f} |")
    return "\n".join(lines)


def main() -> None:
    from lazystream.synthetic import SIZES, build_qwen3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium", choices=["tiny", "medium"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    n_blocks = SIZES["qwen3"][args.size]["num_hidden_layers"]
    path = Path(f"/tmp/lazystream-bench-qwen3-{args.size}")
    if not (path / "done").exists():
        build_qwen3(path, args.size, max_shard_size="200MB", progress=print)
        (path / "done").write_text("ok\n")
    settings = ["library", str(n_blocks), str(n_blocks // 2), "0"]
    results = run_settings(path, settings, args.device, args.calls, args.tokens)
    print(table(results, n_blocks))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
