"""Bytes streamed per call (exact, from the streamer's stats) and, where transformers runs
its fp8 modules, time per call, of one Qwen3 in bfloat16 and in transformers' fine-grained
fp8 (quantized by transformers' own quantizer and written by its save_pretrained).

    PYTHONPATH=. python tools/bench_fp8.py [--device cuda] [--keep-gpu 0] [--repeat 5] [--out DIR]

transformers keeps its fp8 modules only on a CUDA GPU of compute capability >= 8.9 (it
dequantizes at load elsewhere, which lazystream refuses) and their forward needs its
Triton kernel: on a CPU this prints bytes only. The checkpoint is quantized on the CPU
with the quantizer's environment check passed as on such a GPU (its quantization itself
is plain torch).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SIZE = {"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 128, "num_hidden_layers": 8, "vocab_size": 4096}


def build(root: Path) -> tuple[Path, Path]:
    """The bfloat16 checkpoint and its fp8 quantization by transformers."""
    import torch
    from transformers import FineGrainedFP8Config, Qwen3ForCausalLM
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    from lazystream.synthetic import build_qwen3

    bf16 = build_qwen3(root / "bf16", SIZE, dtype=torch.bfloat16, max_shard_size="4MB")
    check = FineGrainedFP8HfQuantizer.validate_environment
    FineGrainedFP8HfQuantizer.validate_environment = lambda self, *a, **k: None
    try:
        model = Qwen3ForCausalLM.from_pretrained(bf16, quantization_config=FineGrainedFP8Config(
            weight_block_size=[128, 128]))
        model.save_pretrained(root / "fp8", max_shard_size="4MB")
    finally:
        FineGrainedFP8HfQuantizer.validate_environment = check
    return bf16, root / "fp8"


def fp8_runs_here(device: str) -> str | None:
    """None if transformers keeps and runs its fp8 modules on ``device``, else why not."""
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return "transformers dequantizes fp8 at load without a CUDA GPU (and its fp8 forward is a Triton kernel)"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"compute capability {torch.cuda.get_device_capability()} < 8.9: transformers dequantizes at load"
    return None


def measure(path: Path, keep_gpu: int, device: str, repeat: int, timed: bool) -> tuple[int, float | None]:
    import torch

    from lazystream import LazyStreamModel, streamer_of

    model = LazyStreamModel.from_pretrained(path, keep_gpu, device=device)
    ids = torch.randint(0, SIZE["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    with torch.no_grad():
        model(ids)  # warm-up
        nbytes = streamer_of(model).stats().last_call.bytes_streamed
        for _ in range(repeat if timed else 0):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(ids)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    streamer_of(model).close()
    return nbytes, statistics.median(times) if times else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep-gpu", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="where to write the checkpoints (default: a tmpdir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        bf16, fp8 = build(root)
        why = fp8_runs_here(args.device)
        if why is not None:  # bytes only: the fp8 blocks' bytes as the streamer counts them at load
            from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

            from lazystream import LazyStreamModel, streamer_of

            FineGrainedFP8HfQuantizer.validate_environment = lambda self, *a, **k: None
            plan = streamer_of(LazyStreamModel.from_pretrained(fp8, args.keep_gpu, device="cpu", load=False)).plan
            fp8_bytes, fp8_time = sum(b.nbytes for b in plan.blocks if not b.resident), None
            print(f"fp8 not run on {args.device}: {why}; its bytes per call are the plan's streamed blocks")
        else:
            fp8_bytes, fp8_time = measure(fp8, args.keep_gpu, args.device, args.repeat, True)
        bf16_bytes, bf16_time = measure(bf16, args.keep_gpu, args.device, args.repeat, fp8_time is not None)
    print(f"Qwen3 {SIZE}, keep_gpu={args.keep_gpu}, device {args.device}")
    print(f"{'format':10} {'bytes/call':>12} {'vs bf16':>8} {'s/call':>10} {'vs bf16':>8}")
    for name, nbytes, t in (("bfloat16", bf16_bytes, bf16_time), ("fp8", fp8_bytes, fp8_time)):
        ratio = f"{t / bf16_time:8.3f}" if t is not None and bf16_time else f"{'-':>8}"
        print(f"{name:10} {nbytes:12d} {nbytes / bf16_bytes:8.4f} "
              f"{(f'{t:10.4f}' if t is not None else f'{chr(45):>10}')} {ratio}")


if __name__ == "__main__":
    main()
