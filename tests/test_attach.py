"""attach() on user-built models: any nn.Module with a list of like blocks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lazystream.weights import CheckpointWeight
from lazystream import LazyStreamModel, attach, streamer_of
from lazystream.errors import LazyStreamError


class Reversed(nn.Module):
    """Blocks registered 0..n-1 but run n-1..0."""

    def __init__(self, n: int = 5, d: int = 32):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(n))
        self.register_buffer("scale", torch.full((d,), 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in reversed(self.blocks):
            x = x + block(x)
        return x * self.scale


@pytest.fixture
def reversed_ckpt(tmp_path):
    torch.manual_seed(0)
    ref = Reversed().eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "model.safetensors")
    return tmp_path, ref


def meta_model() -> Reversed:
    with torch.device("meta"):
        model = Reversed()
    model.scale = torch.full((32,), 0.5)  # non-persistent buffer: the user builds it for real
    return model.eval()


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_blocks_run_out_of_registration_order(reversed_ckpt, prefetch):
    path, ref = reversed_ckpt
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = ref(x)
    model = attach(meta_model(), path, 1, placement="first", prefetch=prefetch)
    streamer = streamer_of(model)
    with torch.no_grad():
        assert torch.equal(model(x), want)
        first = streamer.stats().last_call
        assert first.stalls >= 1  # the guess (registration order) was wrong
        for _ in range(2):
            assert torch.equal(model(x), want)
            assert streamer.stats().last_call.stalls == 0  # the learned order is right
            assert streamer.stats().last_call.blocks_streamed == 4
    streamer.close()


def test_attach_drops_host_copies_and_keeps_extra_parameters(reversed_ckpt):
    path, ref = reversed_ckpt
    model = Reversed().eval()  # built on the CPU with its own random weights
    model.adapter = nn.Parameter(torch.zeros(32))  # not in the checkpoint: stays resident
    x = torch.randn(2, 32)
    attach(model, path, 0)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert model.adapter.device.type == "cpu" and torch.equal(model.adapter, torch.zeros(32))
    weight = model.blocks[0][0].weight  # streamed: no host copy between calls, only the checkpoint's bytes
    assert isinstance(weight, CheckpointWeight) and weight.device.type == "cpu"
    assert torch.equal(weight, ref.blocks[0][0].weight)
    streamer_of(model).close()


def test_attach_refuses_accelerate_hooks(reversed_ckpt):
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = meta_model()
    add_hook_to_module(model.blocks[2], ModelHook())
    with pytest.raises(LazyStreamError, match="module 'blocks.2' already carries accelerate offloading hooks"):
        attach(model, reversed_ckpt[0], 1)


def test_attach_twice_refused(reversed_ckpt):
    model = attach(meta_model(), reversed_ckpt[0], 1)
    with pytest.raises(LazyStreamError, match="already streamed by lazystream"):
        attach(model, reversed_ckpt[0], 1)
    streamer_of(model).close()


def test_model_cls_override(tmp_path):
    from transformers import Qwen3ForCausalLM

    from lazystream.synthetic import build_qwen3

    class MyQwen(Qwen3ForCausalLM):
        pass

    path = build_qwen3(tmp_path, max_shard_size="60KB")
    model = LazyStreamModel.from_pretrained(path, 1, model_cls=MyQwen)
    assert type(model) is MyQwen
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, Qwen3ForCausalLM.from_pretrained(path)(ids).logits)
    streamer_of(model).close()
