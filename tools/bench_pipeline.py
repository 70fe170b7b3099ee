"""Time per image and peak memory of a whole Z-Image pipeline: lazystream against diffusers'
offloading methods, one process per method, in one run.

    python tools/bench_pipeline.py [--size medium] [--device cpu] [--images 3] [--steps 3] [--threads 1] [--json out.json]

Builds (once, under /tmp) a random-weight ZImagePipeline of the --size preset of
lazystream.synthetic.PIPELINE_SIZES (medium: 2.9 GB in float32, real: 20.5 GB in bfloat16),
then for each method loads it in a fresh process, generates one warm-up image and --images
timed ones (one prompt, no guidance, as Z-Image Turbo runs), and reports the median time
per image and per transformer call (the warm-up's left out; a phase's first call includes
its switch), the load time, the peak growth of anonymous host RSS over load and images, and
the device memory: on CUDA the allocator's peak; on the CPU device lazystream's own account
(largest phase of the streamed components plus the other components' bytes), and nothing
for the peers, whose "device" is the host memory they share with everything else.

Methods: resident (``from_pretrained`` then ``.to(device)``), diffusers'
``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``, ``enable_group_offload``
(block level, one block per group; with a CUDA stream on CUDA), and lazystream with the
resident share of the request that started the project (22 of 30 transformer blocks, 20
of 36 text-encoder layers) and with nothing resident. A method that fails is reported
with its error, not a number.

--threads sets torch's intra-op threads in each process. On a shared 2-core machine keep 1:
with 2, every matmul waits at OpenMP barriers whenever another process holds a core (the
transformer step measured 1.8 s with 1 thread and 7-9 s with 2 under such load).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ["resident", "model_cpu_offload", "sequential_cpu_offload", "group_offload", "lazystream_share",
           "lazystream_0"]

CHILD = r"""
import json, statistics, sys, time
import torch
from diffusers import ZImagePipeline
from lazystream.pipeline import LazyStreamPipeline, phases_of
from lazystream.telemetry import PeakRssAnon

path, method, device, images, steps, side, te_keep, tr_keep, dtype, threads = sys.argv[1:11]
dev, images, steps, side, dtype = torch.device(device), int(images), int(steps), int(side), getattr(torch, dtype)
torch.set_num_threads(int(threads))
cuda = dev.type == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
torch.ones(1) @ torch.ones(1)
with PeakRssAnon() as rss:
    start = time.perf_counter()
    if method.startswith("lazystream"):
        keep = {"text_encoder": int(te_keep), "transformer": int(tr_keep)} if method == "lazystream_share" else \
            {"text_encoder": 0, "transformer": 0}
        pipe = LazyStreamPipeline.from_pretrained(path, keep, device=dev, dtype=dtype)
    else:
        pipe = ZImagePipeline.from_pretrained(path, dtype=dtype)
        if method == "resident":
            pipe.to(dev)
        elif method == "model_cpu_offload":
            pipe.enable_model_cpu_offload(device=dev)
        elif method == "sequential_cpu_offload":
            pipe.enable_sequential_cpu_offload(device=dev)
        elif method == "group_offload":
            pipe.enable_group_offload(onload_device=dev, offload_type="block_level", num_blocks_per_group=1,
                                      use_stream=cuda)
    sync()
    load = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    steps_s, step_start = [], []
    def step_begins(*_):
        sync()
        step_start.append(time.perf_counter())
    def step_ends(*_):
        sync()
        steps_s.append(time.perf_counter() - step_start[-1])
    pipe.transformer.register_forward_pre_hook(step_begins)
    pipe.transformer.register_forward_hook(step_ends)
    times = []
    for i in range(images + 1):
        start = time.perf_counter()
        pipe("a lighthouse on a cliff at dawn", height=side, width=side, num_inference_steps=steps,
             guidance_scale=0.0, max_sequence_length=64, generator=torch.Generator().manual_seed(i),
             output_type="pt")
        sync()
        times.append(time.perf_counter() - start)
out = {"method": method, "load_s": load, "image_s": times[1:], "median_s": statistics.median(times[1:]),
       "step_median_s": statistics.median(steps_s[steps:]), "host_anon_peak_growth": rss.growth}
if cuda:
    out["device_peak"] = torch.cuda.max_memory_allocated(dev)
elif method.startswith("lazystream"):
    phases = phases_of(pipe)
    others = sum(t.numel() * t.element_size() for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                 and c not in [s.model for s in phases.streamers.values()] for t in [*c.parameters(), *c.buffers()])
    out["device_peak"] = max(sum(p.device_bytes.values()) for p in phases.last_call) + others
    out["phases"] = [{"component": p.component, "calls": p.calls, "seconds": p.seconds, "switch_s": p.switch_seconds}
                     for p in phases.last_call]
print(json.dumps(out))
"""


def run_methods(path: Path, methods: list[str], args: argparse.Namespace, keep: tuple[int, int]) -> list[dict]:
    results = []
    for method in methods:
        argv = [str(path), method, args.device, str(args.images), str(args.steps), str(args.side), str(keep[0]),
                str(keep[1]), args.dtype, str(args.threads)]
        run = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
        if run.returncode:
            lines = run.stderr.strip().splitlines()
            error = next((line for line in reversed(lines) if re.match(r"\w+(Error|Exception)\b", line)), lines[-1])
            results.append({"method": method, "error": error[:200]})
        else:
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    return results


def table(results: list[dict], keep: tuple[int, int]) -> str:
    mib = 2**20
    names = {"lazystream_share": f"lazystream keep_gpu={{text_encoder: {keep[0]}, transformer: {keep[1]}}}",
             "lazystream_0": "lazystream keep_gpu=0 for both"}
    base = next((r["median_s"] for r in results if r["method"] == "resident" and "error" not in r), None)
    lines = ["| method | s per image, median (range) | × resident | transformer s per step | load s | "
             "host anon peak MiB | device peak MiB |", "|---|---|---|---|---|---|---|"]
    for r in results:
        name = names.get(r["method"], f"`{r['method']}`")
        if "error" in r:
            lines.append(f"| {name} | fails: {r['error']} | | | | | |")
            continue
        ratio = f"{r['median_s'] / base:.2f}" if base else "—"
        device = f"{r['device_peak'] / mib:.0f}" if "device_peak" in r else "—"
        lines.append(f"| {name} | {r['median_s']:.2f} ({min(r['image_s']):.2f}–{max(r['image_s']):.2f}) | {ratio} | "
                     f"{r['step_median_s']:.2f} | {r['load_s']:.2f} | {r['host_anon_peak_growth'] / mib:.0f} | {device} |")
    return "\n".join(lines)


def main() -> None:
    from lazystream.synthetic import PIPELINE_SIZES, build_zimage_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium", choices=sorted(PIPELINE_SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    parser.add_argument("--side", type=int, default=128, help="image height and width in pixels")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    sizes = PIPELINE_SIZES[args.size]
    layers = sizes["text_encoder"]["num_hidden_layers"]
    blocks = sizes["transformer"]["n_layers"] + 2 * sizes["transformer"]["n_refiner_layers"]
    keep = (round(layers * 20 / 36), round(blocks * 22 / 34))  # the request: 20 of 36 layers, 22 of 34 blocks
    path = Path(f"/tmp/lazystream-bench-zimage-pipeline-{args.size}-{args.dtype}")
    if not (path / "done").exists():
        build_zimage_pipeline(path, args.size, dtype=getattr(torch, args.dtype), max_shard_size="200MB", progress=print)
        (path / "done").write_text("ok\n")
    results = run_methods(path, args.methods, args, keep)
    print(table(results, keep))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
