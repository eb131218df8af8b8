"""LoRA file layouts, the conversion between them, the check that a LoRA fits a model, and applying
several LoRA files to a pipeline.

diffusers layout (what `pipe.load_lora_weights` reads):
    transformer.<diffusers module>.lora_A.weight   (rank, in)
    transformer.<diffusers module>.lora_B.weight   (out, rank)
    header "lora_adapter_metadata": the peft LoraConfig (r, lora_alpha, target_modules, ...), keys
    prefixed "transformer."; the update is (lora_alpha / r) * B @ A.
ComfyUI layout (what ComfyUI's LoRA loader reads):
    diffusion_model.<original module>.lora_down.weight   = lora_A
    diffusion_model.<original module>.lora_up.weight     = lora_B
    diffusion_model.<original module>.alpha              = lora_alpha (a 0-d tensor per layer)
    where <original module> is the model's name in its original code base (Wan: self_attn.q, ...),
    given by the backbone's `comfyui_renames`.
"""

from __future__ import annotations

import json
import re

import torch

from happyhorse_train.errors import UserInputError

DIFFUSERS_PREFIX, COMFYUI_PREFIX = "transformer.", "diffusion_model."
LORA_FORMATS = ("diffusers", "comfyui")  # what lora.save_formats may name
LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME = "pytorch_lora_weights.safetensors", "comfyui_lora.safetensors"
StateDict = dict[str, torch.Tensor]
Renames = list[tuple[str, str]]  # (diffusers module-path fragment, original fragment), whole path segments


def _rename(module: str, renames: Renames, reverse: bool = False) -> str:
    for diffusers_name, original_name in renames:
        source, target = (original_name, diffusers_name) if reverse else (diffusers_name, original_name)
        module = re.sub(rf"(^|\.){re.escape(source)}(?=$|\.)", lambda m: m.group(1) + target, module)
    return module


def diffusers_to_comfyui(state_dict: StateDict, alpha: float, renames: Renames) -> StateDict:
    converted = {}
    for key, tensor in state_dict.items():
        match = re.fullmatch(rf"{re.escape(DIFFUSERS_PREFIX)}(.+)\.(lora_A|lora_B)\.weight", key)
        if match is None:  # e.g. a DoRA magnitude or a LoRA bias, which ComfyUI's layout has no key for
            raise UserInputError(f"{key!r} is not a LoRA A or B weight: ComfyUI's layout has no key for it")
        module, kind = match.groups()
        target = COMFYUI_PREFIX + _rename(module, renames)
        converted[f"{target}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = tensor
        converted[f"{target}.alpha"] = torch.tensor(float(alpha))
    return converted


def comfyui_to_diffusers(state_dict: StateDict, renames: Renames) -> tuple[StateDict, float]:
    """The diffusers tensors and the one alpha they share (files with per-layer alphas are refused)."""
    converted, alphas = {}, set()
    for key, tensor in state_dict.items():
        match = re.fullmatch(rf"{re.escape(COMFYUI_PREFIX)}(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        if match is None:
            raise UserInputError(f"not a ComfyUI LoRA key: {key!r}")
        module, kind = match.groups()
        if kind == "alpha":
            alphas.add(float(tensor))
            continue
        name = "lora_A" if kind.startswith("lora_down") else "lora_B"
        converted[f"{DIFFUSERS_PREFIX}{_rename(module, renames, reverse=True)}.{name}.weight"] = tensor
    if len(alphas) > 1:
        raise UserInputError(f"the LoRA has {len(alphas)} different alphas; the diffusers layout holds one")
    ranks = [t.shape[0] for k, t in converted.items() if k.endswith("lora_A.weight")]
    if not ranks:
        raise UserInputError("the file has no lora_down weights: not a LoRA")
    return converted, alphas.pop() if alphas else float(ranks[0])


def adapter_metadata(rank: int, alpha: float, target_modules: list[str]) -> dict:
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(target_modules), "use_dora": False,
            "lora_bias": False}


def pack_adapter_metadata(metadata: dict) -> str:
    prefixed = {f"{DIFFUSERS_PREFIX}{key}": value for key, value in metadata.items()}
    return json.dumps(prefixed, sort_keys=True, default=list)


def unpack_adapter_metadata(header: dict) -> dict:
    raw = json.loads(header.get("lora_adapter_metadata", "{}"))
    return {key.removeprefix(DIFFUSERS_PREFIX): value for key, value in raw.items()}


def check_lora_matches(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    """Raise a UserInputError unless every diffusers-layout LoRA pair fits a Linear layer of `model`.

    peft would otherwise skip unknown modules with a warning, or fail deep inside with a shape error.
    """
    modules = dict(model.named_modules())
    problems, pairs = [], 0
    for key, down in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        pairs += 1
        name = key.removeprefix(DIFFUSERS_PREFIX).removesuffix(".lora_A.weight")
        up = state_dict.get(key.replace(".lora_A.", ".lora_B."))
        target = modules.get(name)
        target = getattr(target, "base_layer", target)  # a layer that already carries an adapter is wrapped by peft
        if not isinstance(target, torch.nn.Linear):
            problems.append(f"no linear layer {name!r} in this model")
        elif up is None:
            problems.append(f"{name}: lora_B is missing")
        elif down.shape[1] != target.in_features or up.shape[0] != target.out_features:
            problems.append(
                f"{name}: LoRA maps {down.shape[1]}->{up.shape[0]} features, the model layer "
                f"{target.in_features}->{target.out_features}"
            )
    if pairs == 0:
        raise UserInputError(f"{source} holds no LoRA weights (no '*.lora_A.weight' keys)")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UserInputError(
            f"{source} does not fit this model ({type(model).__name__}): {len(problems)} of {pairs} LoRA layers "
            f"do not match: {shown}. Was it trained for another model or preset?"
        )


def apply_loras(pipe, paths: list[str], scales: list[float]) -> list[str]:
    """Load each LoRA as its own adapter of any diffusers pipeline with LoRA support (HappyHorsePipeline,
    WanPipeline) and activate them together with their weights; returns the adapter names."""
    if scales and len(scales) != len(paths):
        raise UserInputError(f"{len(scales)} lora_scales for {len(paths)} loras; give one scale per LoRA or none")
    names = [f"lora_{index}" for index in range(len(paths))]
    for name, path in zip(names, paths):
        pipe.load_lora_weights(path, adapter_name=name)
    if names:
        pipe.set_adapters(names, adapter_weights=list(scales) or [1.0] * len(names))
    return names
