"""A streamed pipeline is the one diffusers' own from_pretrained gives: the same component
dtypes for every dtype form, the attributes its __init__ derives from the components, the
same images, the library's class names in what it saves, from_pipe; and every keyword of
diffusers' from_pretrained is honoured or refused by name."""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch
from diffusers import (AutoencoderKL, AutoPipelineForImage2Image, DiffusionPipeline, PipelineQuantizationConfig,
                       StableDiffusionXLPipeline, ZImageImg2ImgPipeline, ZImagePipeline,
                       ZImageTransformer2DModel)
from transformers import BitsAndBytesConfig

from lazystream import LazyStreamModel
from lazystream.errors import UnsupportedKeywordError, UnsupportedQuantizationError
from lazystream.pipeline import LazyStreamPipeline, phases_of
from lazystream.pipeline.keywords import REFUSED
from lazystream.synthetic import build_zimage_pipeline
from pipelines import SDXL_SAMPLE_SIZE, SDXL_VAE_SCALE, build_sdxl_pipeline

ZIMAGE_STREAMED = {"transformer": 1, "text_encoder": 1, "vae": 0}
SDXL_STREAMED = {"unet": 1, "text_encoder": 1, "text_encoder_2": 0, "vae": 0}
# Guidance doubles the batch (see tests/test_pipeline.py on one-row matmuls).
ZIMAGE_CALL = dict(prompt="a red cat", guidance_scale=2.0, num_inference_steps=2, height=32, width=32,
                   max_sequence_length=48)
SDXL_CALL = dict(prompt=["a red cat", "a lighthouse"], num_inference_steps=2)  # no size: the pipeline's default


STRING_DTYPES = pytest.mark.skipif(
    "str" not in str(inspect.signature(LazyStreamModel.from_pretrained).parameters["dtype"].annotation),
    reason="LazyStreamModel.from_pretrained takes no dtype strings yet (the model side of issue 18)")


def run(pipe, call, output_type="pt", **kwargs):
    return pipe(generator=torch.Generator().manual_seed(5), output_type=output_type, **call, **kwargs).images


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    return build_zimage_pipeline(tmp_path_factory.mktemp("zimage"), max_shard_size="60KB")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return build_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


def dtypes_of(pipe) -> dict[str, tuple[torch.dtype, set[torch.dtype]]]:
    """Per model component: its dtype and the dtypes of its parameters (keep-in-fp32 modules)."""
    return {name: (c.dtype, {p.dtype for p in c.parameters()}) for name, c in pipe.components.items()
            if isinstance(c, torch.nn.Module)}


@pytest.mark.parametrize("kwargs", [
    dict(torch_dtype=torch.bfloat16),
    dict(dtype=torch.bfloat16),
    dict(dtype={"transformer": torch.bfloat16, "default": torch.float32}),
    dict(dtype={"text_encoder": torch.bfloat16, "vae": torch.bfloat16}),  # no "default": the others float32
    dict(dtype="bfloat16"),  # no torch.dtype: diffusers loads float32
    # Strings in a dict reach each component's loader, whose library reads them: transformers
    # "bfloat16" and "auto", diffusers float32 (it warns). Needs the model loader's dtype forms.
    pytest.param(dict(dtype={"text_encoder": "bfloat16", "transformer": "bfloat16", "vae": "bfloat16"}),
                 marks=STRING_DTYPES),
    pytest.param(dict(dtype={"text_encoder": "auto", "default": torch.bfloat16}), marks=STRING_DTYPES),
], ids=["torch_dtype", "dtype", "dict-with-default", "dict-without-default", "string", "dict-of-strings",
        "dict-auto"])
def test_component_dtypes_are_the_librarys(zimage, kwargs):
    ref = DiffusionPipeline.from_pretrained(zimage, **kwargs)
    pipe = LazyStreamPipeline.from_pretrained(zimage, ZIMAGE_STREAMED, **kwargs)
    assert dtypes_of(pipe) == dtypes_of(ref)
    want = run(ref, ZIMAGE_CALL)
    assert torch.equal(run(pipe, ZIMAGE_CALL), want)
    phases_of(pipe).close()


def test_the_dtype_forms_change_the_components(zimage):
    """Negative control of the test above: each form gives another set of dtypes than the
    checkpoint's float32, so a loader that dropped the keyword would fail it."""
    seen = [dtypes_of(DiffusionPipeline.from_pretrained(zimage, dtype=dtype)) for dtype in (
        None, torch.bfloat16, {"transformer": torch.bfloat16, "default": torch.float32},
        {"text_encoder": torch.bfloat16, "vae": torch.bfloat16})]
    assert len({repr(sorted(d.items())) for d in seen}) == len(seen)


def test_a_single_file_component_gets_the_dtype_diffusers_gives_it(zimage, tmp_path):
    """single_files={"transformer": file} under a dict dtype: as the library's pipeline with
    transformer=ZImageTransformer2DModel.from_single_file(file, torch_dtype=<the dict's entry>)."""
    from safetensors.torch import save_file

    from lazystream.synthetic.single_file import original_zimage_state

    state = ZImageTransformer2DModel.from_pretrained(zimage, subfolder="transformer").state_dict()
    file = tmp_path / "z_image.safetensors"
    save_file({name: value.contiguous() * 1.5 for name, value in original_zimage_state(state).items()}, file)
    dtype = {"transformer": torch.bfloat16, "default": torch.float32}
    transformer = ZImageTransformer2DModel.from_single_file(str(file), config=str(zimage), subfolder="transformer",
                                                            torch_dtype=torch.bfloat16)
    ref = ZImagePipeline.from_pretrained(zimage, transformer=transformer, dtype=dtype)
    pipe = LazyStreamPipeline.from_pretrained(zimage, ZIMAGE_STREAMED, single_files={"transformer": file}, dtype=dtype)
    assert dtypes_of(pipe) == dtypes_of(ref) and pipe.transformer.dtype == torch.bfloat16
    assert torch.equal(run(pipe, ZIMAGE_CALL), run(ref, ZIMAGE_CALL))
    phases_of(pipe).close()


def test_torch_dtype_and_dtype_together_are_refused_as_diffusers_refuses(zimage):
    with pytest.raises(ValueError, match="both `dtype` and `torch_dtype`"):
        LazyStreamPipeline.from_pretrained(zimage, ZIMAGE_STREAMED, dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_init_derives_its_attributes_from_the_streamed_components(zimage, sdxl):
    """vae_scale_factor from a streamed VAE that downsamples by 2, default_sample_size from a
    streamed UNet of sample_size 16: not diffusers' fallbacks (8 and 128) for a missing component."""
    for path, keep_gpu in ((zimage, ZIMAGE_STREAMED), (sdxl, SDXL_STREAMED)):
        ref = DiffusionPipeline.from_pretrained(path)
        pipe = LazyStreamPipeline.from_pretrained(path, keep_gpu)
        assert pipe.vae_scale_factor == ref.vae_scale_factor == SDXL_VAE_SCALE != 8
        assert dict(pipe.image_processor.config) == dict(ref.image_processor.config)
        if path == sdxl:
            assert pipe.default_sample_size == ref.default_sample_size == SDXL_SAMPLE_SIZE != 128
        phases_of(pipe).close()


def test_sdxl_at_its_default_size_equals_the_library_pipeline(sdxl):
    ref = StableDiffusionXLPipeline.from_pretrained(sdxl)
    want = run(ref, SDXL_CALL)
    assert want.shape[-2:] == (SDXL_SAMPLE_SIZE * SDXL_VAE_SCALE,) * 2
    pipe = LazyStreamPipeline.from_pretrained(sdxl, SDXL_STREAMED)
    assert torch.equal(run(pipe, SDXL_CALL), want)
    assert torch.equal(run(pipe, SDXL_CALL, output_type="latent"), run(ref, SDXL_CALL, output_type="latent"))
    phases_of(pipe).close()


def test_the_class_diffusers_sees_is_the_librarys(zimage):
    ref = ZImagePipeline.from_pretrained(zimage)
    pipe = LazyStreamPipeline.from_pretrained(zimage, ZIMAGE_STREAMED)
    assert isinstance(pipe, ZImagePipeline)
    assert (type(pipe).__name__, type(pipe).__qualname__, type(pipe).__module__) == (
        "ZImagePipeline", "ZImagePipeline", ZImagePipeline.__module__)
    assert json.loads(pipe.to_json_string()) == json.loads(ref.to_json_string())
    assert repr(pipe).split(" ", 1)[0] == "ZImagePipeline"
    phases_of(pipe).close()


def test_save_pretrained_writes_what_the_library_writes(zimage, tmp_path):
    ref = ZImagePipeline.from_pretrained(zimage)
    pipe = LazyStreamPipeline.from_pretrained(zimage, ZIMAGE_STREAMED)
    ref.save_pretrained(tmp_path / "ref")
    pipe.save_pretrained(tmp_path / "streamed")
    index = json.loads((tmp_path / "streamed" / "model_index.json").read_text())
    assert index == json.loads((tmp_path / "ref" / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "streamed")
    assert type(reloaded) is ZImagePipeline
    assert torch.equal(run(reloaded, ZIMAGE_CALL), run(ref, ZIMAGE_CALL))
    phases_of(pipe).close()


def test_from_pipe_shares_the_streamed_components_and_equals_the_library(zimage, sdxl):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for path, keep_gpu, make, call in (
        (zimage, ZIMAGE_STREAMED, ZImageImg2ImgPipeline.from_pipe, dict(ZIMAGE_CALL, strength=0.6)),
        (sdxl, SDXL_STREAMED, AutoPipelineForImage2Image.from_pipe, dict(SDXL_CALL, strength=0.5,
                                                                           num_inference_steps=4)),
    ):
        ref = make(DiffusionPipeline.from_pretrained(path))
        pipe = LazyStreamPipeline.from_pretrained(path, keep_gpu)
        derived = make(pipe)
        # The library's class as its API shows it (a subclass bearing its name ends each call's last phase).
        assert isinstance(derived, type(ref)) and type(ref).__name__.endswith("Img2ImgPipeline")
        assert (type(derived).__name__, type(derived).__qualname__, type(derived).__module__) == (
            type(ref).__name__, type(ref).__qualname__, type(ref).__module__)
        class_name = json.loads(derived.to_json_string())["_class_name"]  # as model_index.json writes it
        assert class_name == json.loads(ref.to_json_string())["_class_name"] == type(ref).__name__
        assert all(getattr(derived, name) is getattr(pipe, name) for name in keep_gpu)
        assert torch.equal(run(derived, call, image=image), run(ref, call, image=image))
        phases = phases_of(pipe)
        assert phases_of(derived) is phases
        assert {p.component for p in phases.last_call} >= set(keep_gpu)
        phases.close()


def test_a_from_pipe_pipeline_ends_each_call_as_the_original(zimage, sdxl):
    """Each call of a pipeline made by from_pipe (class and AutoPipeline*) ends its last
    phase, also when it raises: nothing stays active and last_call holds that call alone."""
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for path, keep_gpu, make, call in (
        (zimage, ZIMAGE_STREAMED, ZImageImg2ImgPipeline.from_pipe, dict(ZIMAGE_CALL, strength=0.6)),
        (sdxl, SDXL_STREAMED, AutoPipelineForImage2Image.from_pipe, dict(SDXL_CALL, strength=0.5,
                                                                           num_inference_steps=4)),
    ):
        pipe = LazyStreamPipeline.from_pretrained(path, keep_gpu)
        phases = phases_of(pipe)
        derived = make(pipe)
        calls = []
        for _ in range(2):
            run(derived, call, image=image)
            assert phases.active is None
            calls.append([(p.component, p.calls) for p in phases.last_call])
            assert all(p.seconds > 0 and p.device_bytes for p in phases.last_call)  # each phase ended
        assert calls[0] == calls[1] and {c for c, _ in calls[0]} >= set(keep_gpu)  # one call's phases, not two

        def fail(*args, **kwargs):
            raise RuntimeError("stop")

        with pytest.raises(RuntimeError, match="stop"):
            run(derived, call, image=image, callback_on_step_end=fail)
        assert phases.active is None
        # The original still ends its own calls, and the derived one still runs after them.
        run(pipe, {k: v for k, v in call.items() if k != "strength"})
        assert phases.active is None
        run(derived, call, image=image)
        assert phases.active is None and [(p.component, p.calls) for p in phases.last_call] == calls[0]
        phases.close()


def test_nothing_is_loaded_twice(zimage, monkeypatch):
    """diffusers loads the VAE it loads once, and no streamed component at all."""
    loads: list[str] = []
    original = AutoencoderKL.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(counting))
    pipe = LazyStreamPipeline.from_pretrained(zimage, {"transformer": 1})
    assert loads == ["AutoencoderKL"]
    phases_of(pipe).close()
    loads.clear()
    pipe = LazyStreamPipeline.from_pretrained(zimage, ZIMAGE_STREAMED)
    assert loads == []
    phases_of(pipe).close()


@pytest.mark.parametrize("config, method, component", [
    (lambda: PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs={"load_in_4bit": True},
                                        components_to_quantize=["transformer"]), "bitsandbytes_4bit", "transformer"),
    (lambda: PipelineQuantizationConfig(quant_backend="bitsandbytes_8bit", quant_kwargs={"load_in_8bit": True}),
     "bitsandbytes_8bit", "t"),  # no components named: diffusers quantizes every component
    (lambda: PipelineQuantizationConfig(quant_mapping={"text_encoder": BitsAndBytesConfig(load_in_4bit=True)}),
     "bitsandbytes", "text_encoder"),
], ids=["components_to_quantize", "every-component", "quant_mapping"])
def test_quantizing_a_streamed_component_is_refused_before_loading(zimage, monkeypatch, config, method, component):
    def fail(*args, **kwargs):
        pytest.fail("loaded before refusing")

    monkeypatch.setattr(ZImagePipeline, "from_pretrained", classmethod(fail))
    monkeypatch.setattr(LazyStreamModel, "from_pretrained", staticmethod(fail))
    with pytest.raises(UnsupportedQuantizationError, match=rf"quantizes '{component}\w*', which keep_gpu streams: "
                                                             rf"quantization method '{method}[^']*' is not streamed"):
        LazyStreamPipeline.from_pretrained(zimage, {"transformer": 1, "text_encoder": 1}, quantization_config=config())


def test_quantizing_the_other_components_is_diffusers_business(zimage):
    """The config reaches diffusers, which quantizes the VAE as it would in its own pipeline:
    here it fails as the library's pipeline fails (bitsandbytes is not installed)."""
    config = PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs={"load_in_4bit": True},
                                        components_to_quantize=["vae"])
    with pytest.raises(Exception) as library:
        ZImagePipeline.from_pretrained(zimage, quantization_config=config)
    with pytest.raises(type(library.value), match=re.escape(str(library.value))):
        LazyStreamPipeline.from_pretrained(zimage, {"transformer": 1, "text_encoder": 1}, quantization_config=config)


def library_keywords() -> set[str]:
    """The keywords the installed DiffusionPipeline.from_pretrained reads: its signature's
    named parameters and what its body pops from or looks up in **kwargs."""
    fn = DiffusionPipeline.from_pretrained
    named = {name for name, p in inspect.signature(fn).parameters.items()
             if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    source = inspect.getsource(fn)
    return (named - {"pretrained_model_name_or_path"}) | set(re.findall(r'kwargs\.(?:pop|get)\("(\w+)"', source)) | \
        set(re.findall(r'"(\w+)" in kwargs', source))


# A value other than the default for each keyword of the library's from_pretrained.
KEYWORD_VALUES = {
    "cache_dir": "/nonexistent-cache", "force_download": True, "proxies": {"https": "http://proxy:1"},
    "local_files_only": True, "token": "hf_x", "revision": "v1", "torch_dtype": torch.bfloat16,
    "dtype": torch.bfloat16, "custom_pipeline": "lpw_stable_diffusion", "custom_revision": "main",
    "provider": "CPUExecutionProvider", "sess_options": object(), "provider_options": {"device_id": 0},
    "device_map": "balanced", "max_memory": {0: "1GiB"}, "offload_folder": "/tmp/offload",
    "offload_state_dict": True, "low_cpu_mem_usage": False, "variant": "fp16", "use_safetensors": True,
    "use_onnx": True, "load_connected_pipeline": True,
    "quantization_config": PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit",
                                                      quant_kwargs={"load_in_4bit": True}, components_to_quantize=["vae"]),
    "use_flashpack": True, "disable_mmap": True, "trust_remote_code": True, "dduf_file": "pipe.dduf",
}


class _Passed(Exception):
    pass


def test_every_keyword_of_the_library_is_honoured_or_refused_by_name(zimage, monkeypatch):
    keywords = library_keywords()
    assert {"device_map", "torch_dtype", "quantization_config", "variant"} <= keywords  # the walk finds them
    assert not keywords - set(KEYWORD_VALUES), (
        f"diffusers' from_pretrained reads {sorted(keywords - set(KEYWORD_VALUES))}, which this test (and "
        "lazystream.pipeline.keywords) does not know: decide whether lazystream honours or refuses each")
    received: list[dict] = []

    def spy(cls, path, **kwargs):
        received.append(kwargs)
        raise _Passed

    monkeypatch.setattr(ZImagePipeline, "from_pretrained", classmethod(spy))
    for name in sorted(keywords):
        value = KEYWORD_VALUES[name]
        received.clear()
        if name in REFUSED:
            with pytest.raises(UnsupportedKeywordError, match=rf"cannot honour {name}="):
                LazyStreamPipeline.from_pretrained(zimage, {"transformer": 1}, pipeline_cls=ZImagePipeline,
                                                   **{name: value})
            assert not received
        else:
            with pytest.raises(_Passed):
                LazyStreamPipeline.from_pretrained(zimage, {"transformer": 1}, pipeline_cls=ZImagePipeline,
                                                   **{name: value})
            # torch_dtype reaches diffusers as dtype, its replacement (diffusers' own helper merges them).
            assert received[0]["dtype" if name == "torch_dtype" else name] is value, name
    assert set(REFUSED) <= keywords, "a refusal of a keyword diffusers does not have"
