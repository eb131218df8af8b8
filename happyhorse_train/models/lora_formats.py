"""LoRA file layouts, reading and converting them, and the check that a LoRA fits a model.

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
    given by the backbone's `comfyui_renames`. A layer without an alpha key has scale 1 (ComfyUI's rule).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from happyhorse_train.errors import UserInputError

DIFFUSERS_PREFIX, COMFYUI_PREFIX = "transformer.", "diffusion_model."
LORA_FORMATS = ("diffusers", "comfyui")  # what lora.save_formats may name
LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME = "pytorch_lora_weights.safetensors", "comfyui_lora.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key
StateDict = dict[str, torch.Tensor]
Renames = list[tuple[str, str]]  # (diffusers module-path fragment, original fragment), whole path segments


def resolve_lora_file(path: str | Path, weight_name: str | None = None) -> Path:
    """The LoRA file `path` names: itself, or `weight_name` (default: the diffusers file) in a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / (weight_name or LORA_WEIGHT_NAME)
    if not path.is_file():
        raise UserInputError(f"LoRA file not found: {path}")
    return path


def read_lora_file(path: Path) -> tuple[StateDict, dict | None]:
    """The tensors and diffusers' adapter metadata (None when the file has none)."""
    try:
        state_dict = safetensors.torch.load_file(path, device="cpu")
        with safetensors.safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
    except (safetensors.SafetensorError, OSError) as error:
        raise UserInputError(f"{path} is not a readable safetensors LoRA file ({error})") from error
    raw = header.get(ADAPTER_METADATA_KEY)
    return state_dict, (json.loads(raw) if raw else None)


def lora_layout(state_dict: StateDict) -> str | None:
    """"diffusers", "comfyui", or None for anything else (another trainer's layout, or not a LoRA)."""
    if any(key.endswith(".lora_A.weight") for key in state_dict):
        return "diffusers"
    if any(key.startswith(COMFYUI_PREFIX) and key.endswith(".lora_down.weight") for key in state_dict):
        return "comfyui"
    return None


def _rename(module: str, renames: Renames, reverse: bool = False) -> str:
    for diffusers_name, original_name in renames:
        source, target = (original_name, diffusers_name) if reverse else (diffusers_name, original_name)
        module = re.sub(rf"(^|\.){re.escape(source)}(?=$|\.)", lambda m: m.group(1) + target, module)
    return module


def comfyui_module(module: str, renames: Renames) -> str:
    """The ComfyUI name of a diffusers module; a backbone with renames must have one for every LoRA layer."""
    renamed = _rename(module, renames)
    if renames and renamed == module:
        raise UserInputError(
            f"the LoRA layer {module!r} has no name in ComfyUI's model: leave it out of lora.target_modules, "
            "or write lora.save_formats=[diffusers] only"
        )
    return renamed


def diffusers_to_comfyui(
    state_dict: StateDict, alpha: float, renames: Renames, alpha_free: tuple[str, ...] = ()
) -> StateDict:
    """ComfyUI's keys for a diffusers-layout LoRA. Modules under an `alpha_free` prefix get no alpha key and
    their lora_up scaled by alpha / rank, the same update for a loader that reads no alpha there."""
    converted = {}
    for key, tensor in state_dict.items():
        match = re.fullmatch(rf"{re.escape(DIFFUSERS_PREFIX)}(.+)\.(lora_A|lora_B)\.weight", key)
        if match is None:  # e.g. a DoRA magnitude or a LoRA bias, which ComfyUI's layout has no key for
            raise UserInputError(f"{key!r} is not a LoRA A or B weight: ComfyUI's layout has no key for it")
        module, kind = match.groups()
        target = COMFYUI_PREFIX + comfyui_module(module, renames)
        folded = any(re.match(rf"{re.escape(prefix)}($|\.)", module) for prefix in alpha_free)
        if kind == "lora_A":
            converted[f"{target}.lora_down.weight"] = tensor
        else:
            rank = tensor.shape[1]
            converted[f"{target}.lora_up.weight"] = tensor * (alpha / rank) if folded else tensor
        if not folded:
            converted[f"{target}.alpha"] = torch.tensor(float(alpha))
    return converted


def comfyui_to_diffusers(state_dict: StateDict, renames: Renames) -> tuple[StateDict, float]:
    """The diffusers tensors and the one alpha they share (files with differing per-layer alphas are refused).
    A layer without an alpha (scale 1 in ComfyUI) gets its lora_up divided by alpha / rank to keep its update."""
    converted, alphas, unscaled = {}, set(), []
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
        if name == "lora_B" and f"{COMFYUI_PREFIX}{module}.alpha" not in state_dict:
            unscaled.append(f"{DIFFUSERS_PREFIX}{_rename(module, renames, reverse=True)}.lora_B.weight")
    if len(alphas) > 1:
        raise UserInputError(f"the LoRA has {len(alphas)} different alphas; the diffusers layout holds one")
    ranks = [t.shape[0] for k, t in converted.items() if k.endswith("lora_A.weight")]
    if not ranks:
        raise UserInputError("the file has no lora_down weights: not a LoRA")
    alpha = alphas.pop() if alphas else float(ranks[0])
    for key in unscaled:
        converted[key] = converted[key] / (alpha / converted[key].shape[1])
    return converted, alpha


def adapter_metadata(rank: int, alpha: float, target_modules: list[str]) -> dict:
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(target_modules), "use_dora": False,
            "lora_bias": False}


def pack_adapter_metadata(metadata: dict) -> str:
    prefixed = {f"{DIFFUSERS_PREFIX}{key}": value for key, value in metadata.items()}
    return json.dumps(prefixed, sort_keys=True, default=list)


def unpack_adapter_metadata(header: dict) -> dict:
    raw = json.loads(header.get(ADAPTER_METADATA_KEY, "{}"))
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
    if pairs == 0 and lora_layout(state_dict) == "comfyui":
        raise UserInputError(
            f"{source} is in ComfyUI's layout, which this loader does not read: convert it with "
            f"python data_tools/convert_lora.py {source} <folder> --to diffusers"
        )
    if pairs == 0:
        raise UserInputError(f"{source} holds no LoRA weights (no '*.lora_A.weight' keys)")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UserInputError(
            f"{source} does not fit this model ({type(model).__name__}): {len(problems)} of {pairs} LoRA layers "
            f"do not match: {shown}. Was it trained for another model or preset?"
        )
