"""What expert-level streaming would save: the router statistics of one call.

lazystream streams a MoE model's whole blocks, every expert of a streamed layer on every
call. Only the experts the router picks are used; this counts them for a prefill call and
for one decode step on tiny random-weight Qwen3-MoE and Mixtral models, and prints the
bytes per call of whole-block streaming against streaming only the routed experts (plus
the rest of each block).

python tools/moe_routing.py [--experts 8] [--top-k 2] [--prompt 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lazystream.synthetic import fill_random_weights  # noqa: E402


def models(experts: int, top_k: int):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    yield "Qwen3-MoE", Qwen3MoeForCausalLM(Qwen3MoeConfig(
        head_dim=32, num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=96, decoder_sparse_step=1,
        **common))
    yield "Mixtral", MixtralForCausalLM(MixtralConfig(
        num_local_experts=experts, num_experts_per_tok=top_k, intermediate_size=192, **common))


def routed(router_logits: tuple[torch.Tensor, ...], top_k: int) -> list[set[int]]:
    """The experts each layer's router picks for any token of the call."""
    return [set(logits.topk(top_k, dim=-1).indices.flatten().tolist()) for logits in router_logits]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64, help="tokens of the prefill call")
    args = parser.parse_args(argv)
    mib = 2**20
    print(f"{'model':<10} {'call':<14} {'experts used per layer':<24} {'whole blocks MiB':>16} "
          f"{'routed only MiB':>15} {'saved':>6}")
    for name, model in models(args.experts, args.top_k):
        fill_random_weights(model, torch.float32, seed=0)
        model.eval()
        layers = model.model.layers
        expert_bytes = [sum(p.nbytes for p in layer.mlp.experts.parameters()) for layer in layers]
        block_bytes = [sum(p.nbytes for p in layer.parameters()) for layer in layers]
        ids = torch.randint(0, 512, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(ids, use_cache=True, output_router_logits=True)
            prefill = routed(out.router_logits, args.top_k)
            step = model(out.logits[:, -1:].argmax(-1), cache=out.past_key_values, use_cache=True,
                         output_router_logits=True)
            decode = routed(step.router_logits, args.top_k)
        for call, used in ((f"prefill {args.prompt}", prefill), ("decode 1", decode)):
            whole = sum(block_bytes)
            only = sum(b - e + e * len(u) / args.experts for b, e, u in zip(block_bytes, expert_bytes, used))
            counts = "/".join(str(len(u)) for u in used) + f" of {args.experts}"
            print(f"{name:<10} {call:<14} {counts:<24} {whole / mib:>16.2f} {only / mib:>15.2f} "
                  f"{1 - only / whole:>6.0%}")


if __name__ == "__main__":
    main()
