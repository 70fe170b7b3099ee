"""Tiny pipelines the pipeline tests build, with sizes the library's fallbacks do not
match: a StableDiffusionXLPipeline whose UNet's sample_size is 16 (the fallback is 128)
and whose VAE downsamples by 2 (the fallback is 8)."""

from __future__ import annotations

from pathlib import Path

import torch

SDXL_SAMPLE_SIZE, SDXL_VAE_SCALE = 16, 2


def clip_tokenizer():
    """A ``CLIPTokenizer`` built offline: one token per byte (no merges); ids below 514."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab |= {char + "</w>": len(alphabet) + i for i, char in enumerate(alphabet)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def build_sdxl_pipeline(path: Path, *, max_shard_size: str = "40KB", seed: int = 0) -> Path:
    """A random-weight StableDiffusionXLPipeline (UNet, two CLIP text encoders, VAE) saved
    by the library's save_pretrained, float32, in shards small enough that blocks straddle them."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lazystream.synthetic import fill_random_weights

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=SDXL_SAMPLE_SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=32)
    config = dict(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32, intermediate_size=37,
                  num_attention_heads=4, num_hidden_layers=4, vocab_size=520, hidden_act="gelu", projection_dim=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    for offset, model in enumerate((unet, vae, text_encoder, text_encoder_2)):
        fill_random_weights(model, torch.float32, seed + offset)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                     scheduler=scheduler)
    pipe.save_pretrained(path, max_shard_size=max_shard_size)
    return path
