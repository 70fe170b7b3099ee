"""What lazystream adds to every call when nothing streams: binding the resident weights
for the call and checking the model for changes (adapters, hooks) before it.

    python tools/bench_call_overhead.py [--layers 4 36] [--tokens 4] [--rounds 5] [--calls 100]

For each layer count, a random-weight Qwen3 (hidden 64, so compute is small and the
bookkeeping shows): the library's model and lazystream with every block resident, timed in
interleaved rounds in one process (one thread), median of the round medians; and the
enter/exit bookkeeping alone, timed on its own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import Qwen3ForCausalLM  # noqa: E402

from lazystream import LazyStreamModel, streamer_of  # noqa: E402
from lazystream.synthetic import build_qwen3  # noqa: E402


def median_call(model, ids, calls: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(calls):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(layers: int, tokens: int, rounds: int, calls: int, work: Path) -> dict:
    path = build_qwen3(work / f"qwen3-{layers}", {"num_hidden_layers": layers}, max_shard_size="200KB")
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(0))
    library = Qwen3ForCausalLM.from_pretrained(path).eval()
    streamed = LazyStreamModel.from_pretrained(path, 10**6)
    for model in (library, streamed):
        median_call(model, ids, 10)
    pairs = [(median_call(library, ids, calls), median_call(streamed, ids, calls)) for _ in range(rounds)]
    streamer = streamer_of(streamed)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(calls * 10):
            streamer._enter()
            streamer._exit()
    bookkeeping = (time.perf_counter() - start) / (calls * 10)
    streamer.close()
    lib, ls = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"layers": layers, "params": sum(1 for _ in library.parameters()), "library_ms": lib, "lazystream_ms": ls,
            "ratio": statistics.median(ls) / statistics.median(lib), "bookkeeping_us": bookkeeping * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 36])
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        print("| layers | parameters | library ms (round medians) | lazystream all resident ms | ratio of medians "
              "| enter+exit us |")
        print("|---|---|---|---|---|---|")
        for layers in args.layers:
            r = measure(layers, args.tokens, args.rounds, args.calls, Path(work))
            fmt = lambda xs: " / ".join(f"{x * 1e3:.2f}" for x in xs)  # noqa: E731
            print(f"| {r['layers']} | {r['params']} | {fmt(r['library_ms'])} | {fmt(r['lazystream_ms'])} | "
                  f"{r['ratio']:.3f} | {r['bookkeeping_us']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
