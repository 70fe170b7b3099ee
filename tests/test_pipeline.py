"""A whole ZImagePipeline with its text encoder and transformer streamed: the same images as
the library's own pipeline, and the components taking turns on the device."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Model

from lazystream import IOConfig, streamer_of
from lazystream.errors import ClosedError
from lazystream.pipeline import LazyStreamPipeline, Phases, phases_of
from lazystream.synthetic import build_zimage_pipeline

TE_LAYERS, TRANSFORMER_BLOCKS = 4, 2 + 2 + 4
STEPS = 3
# Two prompts: with one and no guidance, every matmul of the adaLN modulation has a single
# row, and MKL's one-row kernel rounds differently for weights 16-byte aligned (lazystream's
# buffers) and 8-byte aligned (the library's views of the safetensors file): a last-bit
# difference that is not streaming's. Guidance doubles the batch, so one prompt is exact.
CALLS = {
    "two prompts": (lambda: ["a red cat", "a lighthouse at dawn"], dict(guidance_scale=0.0, num_inference_steps=STEPS)),
    "guidance": (lambda: "a red cat", dict(guidance_scale=2.0, num_inference_steps=2)),
}
COMMON = dict(height=32, width=32, max_sequence_length=48, output_type="pt")


def generate(pipe, call: str) -> torch.Tensor:
    prompts, kwargs = CALLS[call]
    return pipe(prompts(), generator=torch.Generator().manual_seed(7), **kwargs, **COMMON).images


@pytest.fixture(scope="module")
def zimage_pipeline(tmp_path_factory):
    path = build_zimage_pipeline(tmp_path_factory.mktemp("zimage-pipeline"), max_shard_size="60KB")
    ref = ZImagePipeline.from_pretrained(path)
    return path, {call: generate(ref, call) for call in CALLS}


def load(path, keep_gpu, **kwargs):
    return LazyStreamPipeline.from_pretrained(path, keep_gpu, **kwargs)


@pytest.mark.parametrize("keep_gpu", [
    {"transformer": 0, "text_encoder": 0},
    {"transformer": 3, "text_encoder": 1},
    {"transformer": TRANSFORMER_BLOCKS, "text_encoder": TE_LAYERS},
    {"transformer": 2},
], ids=["none-resident", "some-resident", "all-resident", "transformer-only"])
@pytest.mark.parametrize("call", CALLS)
def test_images_equal_the_library_pipeline(zimage_pipeline, keep_gpu, call):
    path, want = zimage_pipeline
    pipe = load(path, keep_gpu)
    assert isinstance(pipe, ZImagePipeline) and type(pipe).__name__ == "ZImagePipeline"
    assert type(pipe.transformer) is ZImageTransformer2DModel and type(pipe.text_encoder) is Qwen3Model
    for _ in range(2):  # the second image runs with the calls per phase learned from the first
        assert torch.equal(generate(pipe, call), want[call])
    phases_of(pipe).close()


def test_auto_fits_each_phase_in_the_whole_budget(zimage_pipeline):
    path, want = zimage_pipeline
    budget = 2 * 2**20  # less than the transformer (3.3 MiB), more than the text encoder (0.7 MiB)
    pipe = load(path, {"transformer": "auto", "text_encoder": "auto"}, max_gpu_memory=budget, activation_reserve=0)
    plans = {name: s.plan for name, s in phases_of(pipe).streamers.items()}
    assert plans["transformer"].streamed and not plans["text_encoder"].streamed
    assert all(plan.device_bytes <= budget for plan in plans.values())
    assert torch.equal(generate(pipe, "two prompts"), want["two prompts"])
    phases_of(pipe).close()


def test_dtype_casts_like_the_library_pipeline(zimage_pipeline):
    """A float32 checkpoint run in bfloat16: the VAE by diffusers, the streamed components on the device."""
    path, _ = zimage_pipeline
    ref = ZImagePipeline.from_pretrained(path, dtype=torch.bfloat16)
    pipe = load(path, {"transformer": 3, "text_encoder": 1}, dtype=torch.bfloat16)
    assert pipe.vae.dtype == pipe.transformer.dtype == pipe.text_encoder.dtype == torch.bfloat16
    got = generate(pipe, "guidance")
    assert got.dtype == torch.bfloat16 and torch.equal(got, generate(ref, "guidance"))
    phases_of(pipe).close()


def test_streamed_components_take_turns_on_the_device(zimage_pipeline):
    path, _ = zimage_pipeline
    pipe = load(path, {"transformer": 3, "text_encoder": 1})
    te, transformer = streamer_of(pipe.text_encoder), streamer_of(pipe.transformer)
    seen: dict[str, set[tuple[int, int]]] = {"text_encoder": set(), "transformer": set(), "vae": set()}

    def record(phase):
        def hook(*_):
            seen[phase].add((te.stats().device_bytes, transformer.stats().device_bytes))
        return hook

    # Hooks inside each component: they see the device while it computes.
    pipe.text_encoder.layers[0].register_forward_pre_hook(record("text_encoder"))
    pipe.transformer.layers[-1].register_forward_pre_hook(record("transformer"))
    pipe.vae.decoder.register_forward_pre_hook(record("vae"))
    # Loading held one component at a time and left the first phase's loaded.
    assert (te.stats().device_bytes, transformer.stats().device_bytes) == (te.plan.device_bytes, 0)
    for _ in range(2):
        generate(pipe, "two prompts")
        assert seen == {"text_encoder": {(te.plan.device_bytes, 0)}, "transformer": {(0, transformer.plan.device_bytes)},
                        "vae": {(0, 0)}}
    phases = phases_of(pipe)
    assert [(p.component, p.calls) for p in phases.last_call] == [("text_encoder", 1), ("transformer", STEPS), ("vae", 1)]
    peak = max(sum(p.device_bytes.values()) for p in phases.last_call)
    assert peak == max(te.plan.device_bytes, transformer.plan.device_bytes) < te.plan.device_bytes + transformer.plan.device_bytes
    assert phases.active is None
    phases.close()


def test_session_spans_the_denoising_loop_and_wastes_no_prefetch(zimage_pipeline):
    """Reads inline (no worker thread), so the counters are exact when a call returns."""
    path, want = zimage_pipeline
    pipe = load(path, {"transformer": 0, "text_encoder": 0}, prefetch=2, io=IOConfig(threaded=False))
    streamer = streamer_of(pipe.transformer)
    plan = streamer.plan
    resident = sum(t.source.nbytes for t in plan.resident_tensors)
    first_two = sum(b.nbytes for b in plan.streamed[:2])
    read_after_call: list[int] = []
    pipe.transformer.register_forward_hook(lambda *_: read_after_call.append(streamer.stats().bytes_read))

    def reads_of_one_image() -> list[int]:
        start = streamer.stats().bytes_read
        read_after_call.clear()
        assert torch.equal(generate(pipe, "two prompts"), want["two prompts"])
        return [n - start for n in read_after_call]

    # The first image does not know how many steps come: its last step prefetches too.
    first = reads_of_one_image()
    assert first == [resident + t * plan.streamed_bytes + first_two for t in range(1, STEPS + 1)]
    # Later images: each step but the last leaves the next step's first blocks read.
    later = reads_of_one_image()
    assert later == [resident + t * plan.streamed_bytes + (first_two if t < STEPS else 0) for t in range(1, STEPS + 1)]
    assert streamer.stats().last_call.stalls == 0
    phases_of(pipe).close()


def test_unload_then_the_next_image_loads_again(zimage_pipeline):
    path, want = zimage_pipeline
    pipe = load(path, {"transformer": 3, "text_encoder": 1})
    phases = phases_of(pipe)
    phases.unload()
    assert all(s.stats().device_bytes == 0 for s in phases.streamers.values())
    assert pipe.device == torch.device("cpu")  # not the meta device of the unloaded components
    assert torch.equal(generate(pipe, "guidance"), want["guidance"])
    assert [(p.component, p.calls) for p in phases.last_call] == [("text_encoder", 2), ("transformer", 2), ("vae", 1)]
    phases.close()


def test_an_exception_inside_the_call_ends_the_phase(zimage_pipeline):
    path, want = zimage_pipeline
    pipe = load(path, {"transformer": 2, "text_encoder": 1})

    def interrupt(*_):
        raise KeyboardInterrupt

    prompts, kwargs = CALLS["two prompts"]
    with pytest.raises(KeyboardInterrupt):
        pipe(prompts(), callback_on_step_end=interrupt, **kwargs, **COMMON)
    phases = phases_of(pipe)
    assert phases.active is None and phases.last_call[-1].component == "transformer"
    assert torch.equal(generate(pipe, "two prompts"), want["two prompts"])
    phases.close()


def test_close_restores_the_pipeline(zimage_pipeline):
    path, _ = zimage_pipeline
    pipe = load(path, {"transformer": 3, "text_encoder": 1})
    streamer_forward = vars(pipe.transformer)["forward"].__wrapped__  # what the phases wrapped
    phases = phases_of(pipe)
    assert isinstance(phases, Phases)
    phases.close()
    phases.close()  # idempotent
    assert type(pipe) is ZImagePipeline
    assert not {"forward", "encode", "decode"} & set(vars(pipe.vae))
    assert vars(pipe.transformer)["forward"] is streamer_forward
    assert all(s.closed for s in phases.streamers.values())
    with pytest.raises(ClosedError, match="was closed"):
        generate(pipe, "two prompts")


def test_bad_arguments_are_refused_before_loading(zimage_pipeline):
    path, _ = zimage_pipeline
    with pytest.raises(ValueError, match="keep_gpu must map component names"):
        load(path, 3)
    with pytest.raises(ValueError, match="keep_gpu must map component names"):
        load(path, {})
    with pytest.raises(ValueError, match="keep_gpu must be an int >= 0"):
        load(path, {"transformer": -1})
    with pytest.raises(ValueError, match=r"'unet', which is no component .* \['scheduler', 'text_encoder'"):
        load(path, {"unet": 3})
    with pytest.raises(ValueError, match="transformers.Qwen2Tokenizer; lazystream streams transformers and diffusers"):
        load(path, {"tokenizer": 3})
    with pytest.raises(ValueError, match="both in keep_gpu and passed as transformer="):
        load(path, {"transformer": 3}, transformer=None)
    with pytest.raises(ValueError, match="phases must be a list of component names"):
        load(path, {"transformer": 3}, phases=["text_encoder", "unet"])


def test_phases_of_a_pipeline_lazystream_did_not_load(zimage_pipeline):
    with pytest.raises(ValueError, match="was not loaded by LazyStreamPipeline.from_pretrained"):
        phases_of(ZImagePipeline.from_pretrained(zimage_pipeline[0]))


def test_pipe_to_a_dtype_recasts_the_streamed_components_as_the_library(zimage_pipeline):
    """pipe.to(bfloat16): diffusers casts its own components; the streamed ones re-plan
    (the unloaded one stays unloaded) and the images equal the library pipeline's after the same call."""
    path, _ = zimage_pipeline
    ref = ZImagePipeline.from_pretrained(path).to(torch.bfloat16)
    pipe = load(path, {"transformer": 3, "text_encoder": 1})
    generate(pipe, "two prompts")
    pipe.to(torch.bfloat16)
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == torch.bfloat16
    got = generate(pipe, "two prompts")
    assert got.dtype == torch.bfloat16 and torch.equal(got, generate(ref, "two prompts"))
    phases_of(pipe).close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_unloaded_pipeline_reports_its_device_and_runs_there(zimage_pipeline):
    """No device property of lazystream's: diffusers reads the device off the components,
    whose checkpoint weights report the device they have during a call, also unloaded."""
    path, _ = zimage_pipeline
    ref = ZImagePipeline.from_pretrained(path).to("cuda")
    pipe = load(path, {"transformer": 3, "text_encoder": 1}, device="cuda")
    phases_of(pipe).unload()
    assert pipe.device.type == pipe._execution_device.type == "cuda"
    assert torch.equal(generate(pipe, "guidance"), generate(ref, "guidance"))
    phases_of(pipe).close()
