"""``lazystream demo``: build (once) a random-weight Qwen3 checkpoint of a few hundred MB,
generate with it streamed and resident, check the tokens agree, show what it cost.

Each mode runs in a fresh process (``python -m lazystream.demo PATH MODE KEEP_GPU TOKENS
[DEVICE]``, which prints one JSON line) so that its host-memory figure is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import LazyStreamError

# About 124M parameters, ~500 MB in float32: 12 blocks of ~25 MB, embeddings ~200 MB.
DEMO_SIZE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
             "head_dim": 64, "intermediate_size": 2048, "vocab_size": 32000}
DEMO_SEED = 0
MODES = ("library", "resident", "streamed")


def demo_checkpoint(progress: Callable[[str], None] = print) -> Path:
    """The demo checkpoint, built on first use under the user's cache folder."""
    from .synthetic import build_qwen3

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lazystream"
    path = cache / "demo-qwen3-124m-fp32"
    if not (path / "done").exists():
        progress(f"building the demo checkpoint in {path} (once)")
        build_qwen3(path, DEMO_SIZE, max_shard_size="64MB", seed=DEMO_SEED, progress=progress)
        (path / "done").write_text("ok\n")
    return path


def demo(keep_gpu: int | None, tokens: int, device: str | None) -> int:
    """Run every mode and print the comparison; 0 if the generated tokens agree.

    ``keep_gpu`` >= 0 and ``tokens`` >= 1 are checked by the caller (the command line).

    Raises:
        UnavailableDeviceError: ``device`` is not on this machine (checked before anything runs).
    """
    from tqdm.auto import tqdm

    from .model import resolve_device

    resolve_device(device)  # a device this machine lacks fails now, not in a child minutes later
    path = demo_checkpoint(progress=lambda line: print(f"  {line}"))
    keep = DEMO_SIZE["num_hidden_layers"] // 2 if keep_gpu is None else keep_gpu
    results = {}
    for mode in tqdm(MODES, desc="loading and generating", unit="run"):
        cmd = [sys.executable, "-m", "lazystream.demo", str(path), mode, str(keep), str(tokens)]
        if device:
            cmd.append(device)
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr, file=sys.stderr, end="")
            return run.returncode
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    mib = 2**20
    print(f"\nStreamed with keep_gpu={keep} of {DEMO_SIZE['num_hidden_layers']} blocks:")
    print(results["streamed"]["plan"])
    print(results["streamed"]["stats"])
    print(f"\n{'mode':<10} {'load s':>7} {'gen s':>7} {'tok/s':>7} {'device MiB':>11} {'host anon MiB':>14}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['load_s']:>7.2f} {r['generate_s']:>7.2f} {tokens / r['generate_s']:>7.1f} "
              f"{r['device_bytes'] / mib:>11.1f} {r['host_anon_growth'] / mib:>14.1f}")
    same = results["streamed"]["tokens"] == results["resident"]["tokens"] == results["library"]["tokens"]
    print(f"\ngenerated tokens identical across library / resident / streamed: {same}")
    return 0 if same else 1


def run_mode(path: str, mode: str, keep_gpu: int, tokens: int, device: str | None) -> dict:
    """One mode in this (fresh) process; returns tokens, timings and memory."""
    import torch
    from transformers import Qwen3ForCausalLM

    from .model import LazyStreamModel, resolve_device, streamer_of
    from .telemetry import rss_anon

    dev = resolve_device(device)
    ids = torch.randint(0, DEMO_SIZE["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0)).to(dev)
    base = rss_anon()
    start = time.perf_counter()
    if mode == "library":
        model = Qwen3ForCausalLM.from_pretrained(path).to(dev).eval()
    else:
        model = LazyStreamModel.from_pretrained(path, 10**6 if mode == "resident" else keep_gpu, device=dev)
    load = time.perf_counter() - start
    with torch.no_grad():
        model(ids)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    generate = time.perf_counter() - start
    result = {"mode": mode, "tokens": out[0, ids.shape[1]:].tolist(), "load_s": load, "generate_s": generate,
              "host_anon_growth": rss_anon() - base}
    if dev.type == "cuda":
        result["device_bytes"] = torch.cuda.max_memory_allocated(dev)
    if mode != "library":
        streamer = streamer_of(model)
        result["plan"] = str(streamer.plan)
        result["stats"] = str(streamer.stats())
        if dev.type != "cuda":
            result["device_bytes"] = streamer.plan.device_bytes
    else:
        result.setdefault("device_bytes", sum(t.nbytes for t in [*model.parameters(), *model.buffers()]))
    return result


if __name__ == "__main__":
    path, mode, keep_gpu, tokens, *device = sys.argv[1:]
    try:
        print(json.dumps(run_mode(path, mode, int(keep_gpu), int(tokens), device[0] if device else None)))
    except LazyStreamError as exc:
        sys.exit(f"lazystream demo: error in the {mode} run: {exc}")
