"""What trains: a peft LoRA on the frozen transformer, or every transformer weight."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from happyhorse_train.errors import UserInputError
from happyhorse_train.models.lora_formats import comfyui_module

if TYPE_CHECKING:
    import peft

# peft is imported inside the functions that use it: config_checks reads LORA_INIT before any model loads, and
# importing peft takes ~3 s, which a config error would otherwise wait for.
LORA_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def make_trainable(
    transformer: torch.nn.Module, mode: str, lora, spec, frozen_dtype: torch.dtype
) -> peft.LoraConfig | None:
    """Freeze or unfreeze; for LoRA, store the frozen base in `frozen_dtype` and the adapter in float32.
    `lora.target_modules` is taken as given; without it, the backbone's (`spec`) default targets, less the
    modules whose output cannot reach the loss.

    Returns the LoraConfig (None for a full fine-tune). Trained weights stay float32 in both modes: the
    optimizer updates them in full precision and autocast runs the matmuls in the compute dtype.
    """
    import peft

    transformer.requires_grad_(False)
    if mode == "full":
        transformer.to(torch.float32).requires_grad_(True)
        return None
    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_modules(lora, spec, transformer),
        init_lora_weights=LORA_INIT[lora.init],
    )
    if not getattr(transformer, "is_quantized", False) and transformer.dtype != frozen_dtype:
        transformer.to(frozen_dtype)  # (a quantized base was loaded in its storage formats on purpose)
    try:
        transformer.add_adapter(config)
    except ValueError as error:  # peft: "Target modules ... not found in the base model"
        raise UserInputError(f"lora.target_modules: {error}") from error
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    skip_lora_input_casts(transformer)
    return config


def check_layout_names(transformer: torch.nn.Module, lora, spec) -> None:
    """Every adapted layer has a name in each layout the final LoRA is written in: found now, not at the end."""
    import peft

    if "comfyui" in lora_save_formats(lora, spec):
        for name, module in transformer.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                comfyui_module(name, spec.comfyui_renames)


def lora_save_formats(lora, spec) -> tuple[str, ...]:
    """The layouts the final LoRA is written in: `lora.save_formats`, or the backbone's when that is null."""
    return spec.default_lora_formats if lora.save_formats is None else tuple(lora.save_formats)


def lora_target_modules(lora, spec, transformer: torch.nn.Module) -> list[str] | str:
    """peft `target_modules`: `lora.target_modules` as given, else the backbone's default suffixes less the
    modules it names unreachable (`spec.unreachable_modules`), as one regex when there are any."""
    if lora.target_modules:
        return list(lora.target_modules)
    suffixes, unreachable = list(spec.default_lora_targets), spec.unreachable_modules(transformer)
    if not unreachable:
        return suffixes
    # A regex rather than peft's `exclude_modules`: the LoRA file stores this config, and diffusers'
    # load_lora_weights hands it to peft with the file's tensors, where an exclude list excludes nothing and
    # peft warns so on every load. fullmatch of "(any prefix.)suffix" is peft's own rule for a suffix list.
    dead = "|".join(re.escape(name) for name in unreachable)
    return rf"(?!(?:{dead})$)(?:.*\.)?(?:{'|'.join(re.escape(suffix) for suffix in suffixes)})"


def skip_lora_input_casts(model: torch.nn.Module) -> None:
    """peft casts each LoRA input to the adapter's float32; autocast casts it straight back for the matmul.
    Skipping the cast saves a float32 copy of every adapted layer's input, with the same result."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}
