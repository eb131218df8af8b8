"""The boundary between a backbone and the generic code: everything the trainer, cache, sample.py and
validation need to know about a model, and nothing else. Each backbone implements one `ModelSpec` (listed in
backbones.py); no generic code branches on which backbone it has."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from happyhorse_train.files import write_atomic
from happyhorse_train.models.latent_space import normalize_latents
from happyhorse_train.models.layout import check_model_folder
from happyhorse_train.models.lora_formats import (
    COMFYUI_WEIGHT_NAME,
    DIFFUSERS_PREFIX,
    LORA_WEIGHT_NAME,
    Renames,
    StateDict,
    check_lora_matches,
    comfyui_to_diffusers,
    diffusers_to_comfyui,
    lora_layout,
    pack_adapter_metadata,
    read_lora_file,
    resolve_lora_file,
)


class Conditioned(NamedTuple):
    """A training input as the pipeline builds it at inference (`ModelSpec.conditioned_input`)."""

    latents: torch.Tensor  # what the transformer is given as its hidden states
    loss_mask: torch.Tensor | None  # (B, 1, T, H, W): where the loss counts (None: everywhere)
    inputs: dict  # further keyword arguments of the backbone's predict_velocity (image embeddings, ...)


def first_frame_loss_mask(latents: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, H, W): ones, less latent frame 0, which an image-to-video model is given, not asked for."""
    mask = torch.ones_like(latents[:, :1])
    mask[:, :, 0] = 0
    return mask


class ModelSpec(ABC):
    name: str
    pipeline_class: type  # a diffusers DiffusionPipeline subclass; its `transformer` is what trains
    transformer_class: type  # the pipeline's transformer class (to build random checkpoints of a preset)
    components: tuple[str, ...] = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    float32_components: tuple[str, ...] = ("vae",)  # loaded in float32 whatever the compute dtype
    # Module-name suffixes (peft `target_modules`) a LoRA adapts when the config names none, less the modules
    # `unreachable_modules` names (training/adapters.py lora_target_modules puts the two together).
    default_lora_targets: list[str]
    # diffusers module-name fragments -> the model's original ones, for ComfyUI-layout LoRA files.
    comfyui_renames: Renames = []
    # diffusers module prefixes whose ComfyUI keys carry no alpha (lora_formats.diffusers_to_comfyui's fold).
    comfyui_alpha_free: tuple[str, ...] = ()
    # The layouts train.py writes when lora.save_formats is null: ComfyUI's only for a model ComfyUI knows.
    default_lora_formats: tuple[str, ...] = ("diffusers",)
    # Whether the pipeline's load_lora_weights converts other layouts (ComfyUI's, other trainers') itself.
    pipeline_converts_lora_layouts: bool = False
    # Class names of the token-wise MLP modules (input (batch, tokens, dim)), which can run in token chunks.
    feed_forward_classes: tuple[str, ...] = ()

    def __init__(self, max_sequence_length: int = 512):
        self.max_sequence_length = max_sequence_length  # prompt tokens, as the pipeline encodes them

    def unreachable_modules(self, transformer: torch.nn.Module) -> list[str]:
        """Full names of modules matching the default LoRA targets whose output never reaches the model's output
        (an adapter there would get no gradient); the default LoRA leaves them out. None by default."""
        return []

    def load_pipeline(
        self, path: str | Path, device: torch.device, dtype: torch.dtype, transformer: torch.nn.Module | None = None,
        transformer_to_device: bool = True,
    ):
        """The inference pipeline users run, from a diffusers-layout folder; `float32_components` stay float32.

        A given `transformer` replaces the folder's (memory/streamed_load.py's quantized one, or a weightless
        meta-device model for the caller to fill later). With `transformer_to_device=False` the transformer
        stays where it is, for the caller to place: the trainer caches latents first, and the 8B transformer
        beside its text encoder (10.6 GiB) and the VAE's encode would overfill a 24 GB card.
        """
        folder = check_model_folder(path, self.pipeline_class.__name__, self.components)
        components = {} if transformer is None else {"transformer": transformer}
        dtypes = {"default": dtype, **dict.fromkeys(self.float32_components, torch.float32)}
        pipe = self.pipeline_class.from_pretrained(folder, dtype=dtypes, **components)
        if transformer_to_device:
            return pipe.to(device)
        for name, component in pipe.components.items():
            if name != "transformer" and isinstance(component, torch.nn.Module):
                component.to(device)
        return pipe

    @abstractmethod
    def clip_encoder(self, pipe, path: str | Path):
        """A `happyhorse_train.data.cache_fill.ClipEncoder` over the pipeline's VAE and text encoder."""

    @abstractmethod
    def predict_velocity(
        self,
        transformer: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None,
        **inputs: torch.Tensor,
    ) -> torch.Tensor:
        """One training forward: the flow-matching velocity for normalized (B, C, T, H, W) latents, with the
        text conditioning prepared exactly as the backbone's pipeline prepares it at inference. `text_mask`
        (B, tokens), True for real tokens, is None when no token is padding; `inputs` are the ones
        `conditioned_input` returned."""

    def image_conditioning(self, transformer: torch.nn.Module) -> str | None:
        """How the model takes an image (None: text to video only); sample.py refuses image= without one."""
        return None

    def conditioned_input(self, transformer: torch.nn.Module, noisy: torch.Tensor, cached: dict) -> Conditioned:
        """The training input made from the noisy latents and the clip's cached conditioning (`cached`: the
        fields its clip encoder stored beside the latents, batched, on the device), exactly as the pipeline
        conditions at inference. Text to video: the noisy latents as they are."""
        return Conditioned(noisy, None, {})

    def normalize_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the space the transformer denoises in (the inverse of what the pipeline decodes)."""
        return normalize_latents(pipe.vae, latents)

    def num_tokens(self, transformer: torch.nn.Module, latent_shape: tuple[int, ...]) -> int:
        """Video tokens one sample of this latent shape becomes (throughput, resolution-dependent shift)."""
        pt, ph, pw = transformer.config.patch_size
        t, h, w = latent_shape[-3:]
        return (t // pt) * (h // ph) * (w // pw)

    def lora_to_comfyui(self, state_dict: StateDict, alpha: float) -> StateDict:
        return diffusers_to_comfyui(state_dict, alpha, self.comfyui_renames, self.comfyui_alpha_free)

    def lora_from_comfyui(self, state_dict: StateDict) -> tuple[StateDict, float]:
        return comfyui_to_diffusers(state_dict, self.comfyui_renames)

    def check_lora_file(self, path: str | Path, transformer: torch.nn.Module) -> None:
        """One line unless the LoRA file fits `transformer`; run before loading, where the pipeline's loader
        would fail deep inside peft or skip layers with a warning. A layout only the pipeline's own converter
        reads (another trainer's) is left to that converter."""
        file = resolve_lora_file(path)
        state_dict, _ = read_lora_file(file)
        layout = lora_layout(state_dict)
        if self.pipeline_converts_lora_layouts and layout == "comfyui":
            pairs = {k: v for k, v in state_dict.items() if k.endswith((".lora_down.weight", ".lora_up.weight"))}
            state_dict, _ = self.lora_from_comfyui(pairs)
        elif self.pipeline_converts_lora_layouts and layout is None:
            return
        check_lora_matches(state_dict, transformer, str(file))

    def save_lora(
        self,
        folder: Path,
        transformer: torch.nn.Module,
        lora_state_dict: dict[str, torch.Tensor],
        adapter_metadata: dict,
        extra_metadata: dict,
        formats: tuple[str, ...] = ("diffusers",),
    ) -> list[Path]:
        """Write the LoRA in each layout asked for (lora_formats.py describes them). Every key is first
        checked against `transformer`, so a file that would not load is never written."""
        tensors = {f"{DIFFUSERS_PREFIX}{k}": v.detach().contiguous().cpu() for k, v in lora_state_dict.items()}
        check_lora_matches(tensors, transformer, "the LoRA being saved")
        extra = {key: json.dumps(value, sort_keys=True, default=str) for key, value in extra_metadata.items()}
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        if "diffusers" in formats:
            header = {"format": "pt", "lora_adapter_metadata": pack_adapter_metadata(adapter_metadata), **extra}
            written.append(self._write(folder / LORA_WEIGHT_NAME, tensors, header))
        if "comfyui" in formats:
            comfy = self.lora_to_comfyui(tensors, adapter_metadata["lora_alpha"])
            written.append(self._write(folder / COMFYUI_WEIGHT_NAME, comfy, {"format": "pt", **extra}))
        return written

    def save_transformer(
        self, folder: Path, transformer: torch.nn.Module, state_dict: dict[str, torch.Tensor], max_shard_size="10GB"
    ) -> list[Path]:
        """Write fully trained weights as a diffusers transformer folder (config.json and safetensors shards of
        at most 10 GB, with an index when there are several). `state_dict` is the gathered whole: under ZeRO-3
        or FSDP, `transformer.state_dict()` holds only this process's shards, which is why diffusers'
        `save_pretrained` (it always saves that) is not used."""
        from diffusers.utils.constants import SAFE_WEIGHTS_INDEX_NAME
        from huggingface_hub import split_torch_state_dict_into_shards

        missing = sorted(set(transformer.state_dict()) - set(state_dict))
        if missing:
            raise RuntimeError(f"the gathered weights lack {len(missing)} of the transformer's tensors: {missing[:3]}")
        folder.mkdir(parents=True, exist_ok=True)
        transformer.save_config(folder)
        split = split_torch_state_dict_into_shards(
            state_dict, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size=max_shard_size
        )
        written = []
        for filename, names in split.filename_to_tensors.items():
            tensors = {name: state_dict[name].detach().contiguous().cpu() for name in names}
            written.append(self._write(folder / filename, tensors, {"format": "pt"}))
        if split.is_sharded:
            index = json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2)
            write_atomic(folder / SAFE_WEIGHTS_INDEX_NAME, lambda temporary: temporary.write_text(index))
            written.append(folder / SAFE_WEIGHTS_INDEX_NAME)
        # Last, so a failed save leaves the earlier weights: shards or an index of an earlier save would
        # otherwise be what diffusers loads.
        for stale in set(folder.glob("diffusion_pytorch_model*.safetensors*")) - set(written):
            stale.unlink()
        return written

    @staticmethod
    def _write(path: Path, tensors: dict, header: dict) -> Path:
        write_atomic(path, lambda temporary: save_file(tensors, str(temporary), metadata=header))
        return path

