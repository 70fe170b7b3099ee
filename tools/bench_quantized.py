"""Bytes streamed and time per call of one Z-Image transformer stored as bfloat16
safetensors and as GGUF (Q8_0, Q4_K, Q4_0), each streamed with keep_gpu=0, in one run.

    PYTHONPATH=. python tools/bench_quantized.py [--dim 768] [--layers 4] [--calls 7] [--device cpu]

Every linear weight whose rows fit the format's blocks is quantized (the others, and the
norms and biases, are F16/F32 as in city96's files); the bfloat16 file holds the same
model's weights. Bytes per call are exact (the streamer's stats); times are medians of
``--calls`` calls after one warm-up call, each format against bfloat16 as a ratio, with
diffusers' own (resident) model of the same file beside it. On the CPU the GGUF forward
also dequantizes every weight on every call (in PyTorch, as diffusers does): that compute
is part of the time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _call(model, inputs) -> float:
    x, t, cap = inputs
    start = time.perf_counter()
    with torch.no_grad():
        model(x, t, cap)
    return time.perf_counter() - start


def _median_time(model, inputs, calls: int) -> float:
    _call(model, inputs)
    return statistics.median(_call(model, inputs) for _ in range(calls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--formats", default="Q8_0,Q4_K,Q4_0")
    args = parser.parse_args()

    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    from lazystream import LazyStreamModel, streamer_of
    from lazystream.synthetic import zimage_config, zimage_inputs
    from lazystream.synthetic.gguf_file import build_zimage_gguf, uniform_format
    from lazystream.synthetic.single_file import build_zimage_single_file

    size = {"dim": args.dim, "n_layers": args.layers, "n_refiner_layers": 1, "n_heads": args.dim // 128,
            "n_kv_heads": args.dim // 128, "axes_dims": [32, 48, 48], "cap_feat_dim": 256}
    x, t, cap = zimage_inputs(zimage_config(size))
    inputs = ([v.bfloat16().to(args.device) for v in x], t.to(args.device), [c.bfloat16().to(args.device) for c in cap])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {"BF16": build_zimage_single_file(folder / "z-bf16.safetensors", size, dtype=torch.bfloat16,
                                                  config_folder=folder / "transformer")}
        for fmt in args.formats.split(","):
            files[fmt] = build_zimage_gguf(folder / f"z-{fmt}.gguf", size, formats=uniform_format(fmt))
        for fmt, file in files.items():
            kwargs = dict(config=str(folder), subfolder="transformer")
            kwargs |= ({"torch_dtype": torch.bfloat16} if fmt == "BF16" else
                       {"quantization_config": GGUFQuantizationConfig(compute_dtype=torch.bfloat16)})
            own = ZImageTransformer2DModel.from_single_file(str(file), **kwargs).eval().to(args.device)
            own_s = _median_time(own, inputs, args.calls)
            del own
            model = LazyStreamModel.from_single_file(file, 0, device=args.device, **kwargs)
            streamer = streamer_of(model)
            seconds = _median_time(model, inputs, args.calls)
            streamed = streamer.stats().last_call.bytes_streamed
            formats = streamer.plan.block_formats
            streamer.close()
            rows.append((fmt, streamed, seconds, own_s, formats))
    base_bytes, base_s = rows[0][1], rows[0][2]
    print(f"Z-Image dim {args.dim}, {args.layers} layers + 2 refiners, keep_gpu=0 on {args.device}, "
          f"median of {args.calls} calls after a warm-up")
    print("| stored as | streamed bytes/call | × bfloat16 bytes | lazystream ms/call | × bfloat16 time | "
          "diffusers' own model ms/call | block bytes by format |")
    print("|---|---|---|---|---|---|---|")
    from lazystream.plan import describe_formats

    for fmt, streamed, seconds, own_s, formats in rows:
        print(f"| {fmt} | {streamed} | {streamed / base_bytes:.3f} | {seconds * 1e3:.1f} | {seconds / base_s:.2f} | "
              f"{own_s * 1e3:.1f} | {describe_formats(formats)} |")


if __name__ == "__main__":
    main()
