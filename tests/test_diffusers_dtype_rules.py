"""A diffusers model built by lazystream gets each parameter's dtype from diffusers' own
loader (``load_model_dict_into_meta``, run on data-less tensors), keep-in-fp32 modules
included: dtypes and outputs equal ``ModelMixin.from_pretrained``'s."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImageTransformer2DModel

from lazystream import LazyStreamModel, streamer_of
from lazystream.synthetic import build_zimage, zimage_config, zimage_inputs


class Fp32TimestepZImage(ZImageTransformer2DModel):
    _keep_in_fp32_modules = ["t_embedder"]


class Fp32TimestepZImageNamedAlone(ZImageTransformer2DModel):
    """One module named by a string, not a list: diffusers' from_pretrained makes it a list."""

    _keep_in_fp32_modules = "t_embedder"


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    return build_zimage(tmp_path_factory.mktemp("z") / "z", max_shard_size="200KB")


def _out(model, dtype):
    x, t, cap = zimage_inputs(zimage_config("tiny"), sizes=((8, 8),), cap_lens=(7,))
    with torch.no_grad():
        return torch.cat([s.flatten() for s in model([v.to(dtype) for v in x], t, [c.to(dtype) for c in cap])[0]])


@pytest.mark.parametrize("cls", [Fp32TimestepZImage, Fp32TimestepZImageNamedAlone, ZImageTransformer2DModel],
                         ids=["keep-in-fp32", "keep-in-fp32-string", "none-kept"])
@pytest.mark.parametrize("keep_gpu", [0, 2])
def test_parameter_dtypes_are_diffusers_own(zimage, cls, keep_gpu):
    ref = cls.from_pretrained(zimage, torch_dtype=torch.bfloat16).eval()
    model = LazyStreamModel.from_pretrained(zimage, keep_gpu, device="cpu", dtype=torch.bfloat16, model_cls=cls)
    want = {n: p.dtype for n, p in ref.named_parameters()}
    assert {n: p.dtype for n, p in model.named_parameters()} == want
    plan = streamer_of(model).plan
    targets = {t.name: t.dtype for b in plan.blocks for t in b.tensors} | {t.name: t.dtype for t in plan.resident_tensors}
    assert targets == want
    kept = {n for n, d in want.items() if d == torch.float32}
    # Negative control: the class's rule is what keeps these in float32 (none without it).
    assert bool(kept) == (cls is not ZImageTransformer2DModel) and all(n.startswith("t_embedder.") for n in kept)
    assert torch.equal(_out(model, torch.bfloat16), _out(ref, torch.bfloat16))
    streamer_of(model).close()
