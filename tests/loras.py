"""Small LoRA adapters for the tiny test models, written as users get them: a diffusers
LoRA file (``pytorch_lora_weights.safetensors``) and a peft adapter folder."""

from __future__ import annotations

from pathlib import Path

import torch

ZIMAGE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
QWEN3_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def zimage_lora(folder: Path, model_path: Path, *, seed: int, rank: int = 4,
                targets: list[str] = ZIMAGE_TARGETS) -> Path:
    """A diffusers LoRA file for the Z-Image transformer at ``model_path``."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    model = ZImageTransformer2DModel.from_pretrained(model_path)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=targets, init_lora_weights=False))
    _randomize(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    ZImagePipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model))
    return folder


def qwen3_adapter(folder: Path, model_path: Path, *, seed: int, rank: int = 4,
                  targets: list[str] = QWEN3_TARGETS) -> Path:
    """A peft adapter folder (adapter_config.json, adapter_model.safetensors) for the Qwen3 at ``model_path``."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    model = get_peft_model(Qwen3ForCausalLM.from_pretrained(model_path),
                           LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=targets, init_lora_weights=False))
    _randomize(model, seed)
    model.save_pretrained(folder)
    return folder
