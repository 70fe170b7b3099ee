"""Every keyword of the installed libraries' loaders (read from their signatures and the
names they pop from ``**kwargs``) is either accepted by lazystream or refused by name:
none is dropped without a word."""

from __future__ import annotations

import inspect

import pytest
import torch

from lazystream import LazyStreamModel, streamer_of
from lazystream.errors import LazyStreamError
from lazystream.keywords import _NEUTRAL, _ONLY, REFUSED, library_keywords
from lazystream.synthetic import build_qwen3, build_zimage
from lazystream.synthetic.single_file import build_zimage_single_file


def _loaders():
    from diffusers import ModelMixin
    from diffusers.loaders.single_file_model import FromOriginalModelMixin
    from transformers import PreTrainedModel

    return {"transformers": (PreTrainedModel.from_pretrained, LazyStreamModel.from_pretrained),
            "diffusers": (ModelMixin.from_pretrained, LazyStreamModel.from_pretrained),
            "single_file": (FromOriginalModelMixin.from_single_file, LazyStreamModel.from_single_file)}


def _cases():
    for library, (theirs, ours) in _loaders().items():
        for name in library_keywords(theirs):
            yield pytest.param(library, name, id=f"{library}-{name}")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("keywords")
    file = build_zimage_single_file(root / "z.safetensors", config_folder=root / "transformer")
    return {"transformers": ((build_qwen3(root / "q"),), {}),
            "diffusers": ((build_zimage(root / "zd"),), {}),
            "single_file": ((file,), {"config": root, "subfolder": "transformer"})}


def _refusing_value(name: str):
    """A value of ``name`` lazystream refuses (one that is not neutral)."""
    if name == "quantization_config":
        return {"quant_method": "fp8", "weight_block_size": [128, 128]}
    neutral = _ONLY[name][0] if name in _ONLY else _NEUTRAL.get(name, (None,))
    return next(v for v in (True, False, "x") if not any(v is n or v == n for n in neutral))


def _library_default(theirs, name: str):
    parameter = inspect.signature(inspect.unwrap(getattr(theirs, "__func__", theirs))).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def test_the_walk_reads_the_libraries_keywords():
    """Negative control: the walk finds the keywords each library documents."""
    loaders = _loaders()
    assert {"device_map", "dtype", "torch_dtype", "quantization_config", "attn_implementation",
            "generation_config", "output_loading_info"} <= set(library_keywords(loaders["transformers"][0]))
    assert {"device_map", "torch_dtype", "quantization_config", "low_cpu_mem_usage"} <= \
        set(library_keywords(loaders["diffusers"][0]))
    assert {"original_config", "torch_dtype", "config_revision"} <= set(library_keywords(loaders["single_file"][0]))


@pytest.mark.parametrize("library, name", list(_cases()))
def test_each_library_keyword_is_accepted_or_refused_by_name(checkpoints, library, name):
    theirs, ours = _loaders()[library]
    args, base = checkpoints[library]
    kwargs = {**base, "device": "cpu", "load": False}
    if name in REFUSED or name in _ONLY or name == "quantization_config":
        with pytest.raises(LazyStreamError, match=rf"\b{name}="):
            ours(*args, 0, **kwargs, **{name: _refusing_value(name)})
        return
    own = inspect.signature(ours).parameters
    if name in own and own[name].kind is inspect.Parameter.KEYWORD_ONLY:
        return  # lazystream's own keyword, documented there with the library's meaning
    kwargs.setdefault(name, _library_default(theirs, name))  # passed on to the library: it must load
    model = ours(*args, 0, **kwargs)
    model = model[0] if isinstance(model, tuple) else model
    streamer_of(model).close()


def test_a_refused_keyword_at_a_neutral_value_is_accepted(checkpoints):
    """``device_map=None`` (the library's default) changes nothing: accepted."""
    (path,), _ = checkpoints["transformers"]
    model = LazyStreamModel.from_pretrained(path, 0, device="cpu", device_map=None, use_safetensors=True,
                                            dtype=torch.float32, load=False)
    streamer_of(model).close()
