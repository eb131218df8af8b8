"""The model on the meta device: exact parameter, LoRA and quantized-weight byte counts from its tensors."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from happyhorse_train.memory.offload import repeated_blocks
from happyhorse_train.memory.quantize import kept_in_float32
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.presets import CONFIG_DIR, load_preset
from happyhorse_train.planner.assumptions import BASE_FORMATS, COMPUTE_DTYPE, FP8_SCALE_BLOCK, NF4_BLOCK
from happyhorse_train.training.adapters import make_trainable


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def meta_transformer(preset: dict, dtype: torch.dtype = COMPUTE_DTYPE):
    """The preset's transformer on the meta device, its weights in `dtype` as diffusers loads them. (model, spec)
    Built in `dtype` directly rather than cast: the same tensors, without diffusers' warning about `.to()`."""
    spec = get_spec(preset["backbone"])
    with torch.device("meta"), _default_dtype(dtype):
        model = spec.transformer_class(**preset["transformer"])
        _keep_in_fp32_as_loaded(model)
    return model, spec


def _keep_in_fp32_as_loaded(model: torch.nn.Module) -> None:
    """What diffusers' from_pretrained(torch_dtype=bf16) does: modules the class names in
    `_keep_in_fp32_modules` (Wan: RoPE, time embedder, norms, modulation table) stay float32."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if kept_in_float32(model, name) and tensor.is_floating_point():
            tensor.data = tensor.data.float()


def meta_training_transformer(preset: dict, lora_rank: int | None) -> torch.nn.Module:
    """The transformer on the meta device as the trainer loads it (bf16 for a LoRA, fp32 for a full fine-tune) and
    made trainable by the trainer's own `make_trainable`, with train.py's LoRA defaults at `lora_rank`."""
    model, spec = meta_transformer(preset, COMPUTE_DTYPE if lora_rank is not None else torch.float32)
    lora = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "lora" / "default.yaml"), {"rank": lora_rank or 1})
    logging.disable(logging.WARNING)  # diffusers' `.to(float32)` warns of fp32 modules, in a model built float32
    try:
        with torch.device("meta"):  # the adapters too
            make_trainable(model, "lora" if lora_rank else "full", lora, spec, COMPUTE_DTYPE)
    finally:
        logging.disable(logging.NOTSET)
    return model.train()


def quantized_linear_bytes(base_format: str, out_features: int, in_features: int) -> int:
    """Bytes of one Linear weight stored in a frozen-base format (scales included, bias not)."""
    n = out_features * in_features
    if base_format == "bf16":
        return 2 * n
    if base_format == "int8":  # bitsandbytes LLM.int8: int8 values + one fp32 scale per output row
        return n + 4 * out_features
    if base_format == "nf4":  # bitsandbytes: two values per byte + one fp32 absmax per block
        return math.ceil(n / 2) + 4 * math.ceil(n / NF4_BLOCK)
    if base_format == "fp8":  # e4m3 values + one fp32 scale per tensor
        return n + 4
    if base_format == "fp8-block":  # e4m3 values + one fp32 scale per 128 x 128 tile
        return n + 4 * math.ceil(out_features / FP8_SCALE_BLOCK) * math.ceil(in_features / FP8_SCALE_BLOCK)
    raise ValueError(f"unknown base format {base_format!r}; known: {', '.join(BASE_FORMATS)}")


def block_bytes_by_format(block: torch.nn.Module) -> dict[str, int]:
    """A block's weight bytes for each base format: its Linear weights quantized, everything else bf16."""
    linear_weights = {id(m.weight) for m in block.modules() if type(m) is torch.nn.Linear}
    return {
        base_format: sum(quantized_linear_bytes(base_format, *p.shape) if id(p) in linear_weights else 2 * p.numel()
                         for p in block.parameters())
        for base_format in BASE_FORMATS
    }


@dataclass
class ModelFacts:
    """Exact parameter counts of a preset's transformer (and its encoders), from its meta-device tensors."""

    preset: str
    backbone: str
    total_params: int
    lora_params: int  # 0 for a full fine-tune
    block_params: list[int]  # per repeated block
    block_bytes: list[dict[str, int]]  # per repeated block: weight bytes per base format
    largest_tensor_params: int  # the biggest single weight (a streaming loader holds one at a time)
    text_encoder_params: int
    vae_params: int

    @property
    def num_blocks(self) -> int:
        return len(self.block_params)

    @property
    def other_params(self) -> int:  # outside the repeated blocks: never quantized, never swapped
        return self.total_params - sum(self.block_params)

    @property
    def trainable_params(self) -> int:
        return self.lora_params or self.total_params

    def base_bytes(self, base_format: str) -> int:
        """The frozen base's bytes in a format (the other parameters stay bf16)."""
        return sum(b[base_format] for b in self.block_bytes) + 2 * self.other_params


def model_facts(preset: dict, lora_rank: int | None) -> ModelFacts:
    model, _ = meta_transformer(preset)
    blocks = repeated_blocks(model)
    lora_params = 0
    if lora_rank is not None:
        with_lora = meta_training_transformer(preset, lora_rank)
        lora_params = sum(p.numel() for p in with_lora.parameters() if p.requires_grad)
    text_encoder, vae = meta_encoders(preset)
    return ModelFacts(
        preset=preset.get("preset", "custom"), backbone=preset["backbone"], total_params=_params(model),
        lora_params=lora_params, block_params=[_params(b) for b in blocks],
        block_bytes=[block_bytes_by_format(b) for b in blocks],
        largest_tensor_params=max(p.numel() for p in model.parameters()),
        text_encoder_params=_params(text_encoder), vae_params=_params(vae),
    )


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_encoders(preset: dict):
    """The text encoder and VAE on the meta device. Presets that leave them to the model folder (Wan) get
    the 8b preset's UMT5-XXL dimensions and diffusers' default VAE (an approximation for the Wan 2.2 VAE)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    text_config = preset.get("text_encoder") or load_preset("8b")["text_encoder"]
    vocab = (preset.get("tokenizer") or {}).get("vocab_size") or text_config.get("vocab_size", 256384)
    with torch.device("meta"):
        text_encoder = UMT5EncoderModel(UMT5Config(**{**text_config, "vocab_size": vocab}))
        vae = AutoencoderKLWan(**(preset.get("vae") or {}))
    return text_encoder, vae
