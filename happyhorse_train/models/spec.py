"""The boundary between a backbone and the generic code: everything the trainer, cache and validation
need to know about a model, and nothing else. Each backbone implements one `ModelSpec`; the loop never
branches on which backbone it has."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch


class ModelSpec(ABC):
    name: str
    # Module-name patterns (peft `target_modules`, regex allowed) a LoRA targets when the config names none.
    default_lora_targets: list[str]

    @abstractmethod
    def load_pipeline(self, path: str | Path, device: torch.device, dtype: torch.dtype):
        """The inference pipeline users run, with every component; its `transformer` is what trains."""

    @abstractmethod
    def clip_encoder(self, pipe, path: str | Path, max_sequence_length: int):
        """A `happyhorse_train.data.caching.ClipEncoder` over the pipeline's VAE and text encoder."""

    @abstractmethod
    def normalize_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the space the transformer denoises in."""

    @abstractmethod
    def predict_velocity(
        self,
        transformer: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """One training forward: the flow-matching velocity for (batch, channels, frames, height, width) latents."""

    @abstractmethod
    def num_tokens(self, transformer: torch.nn.Module, latent_shape: tuple[int, ...]) -> int:
        """Video tokens one sample of this latent shape becomes (for throughput and resolution-dependent shift)."""

    @abstractmethod
    def save_lora(self, path: Path, lora_state_dict: dict, adapter_metadata: dict, extra_metadata: dict) -> None:
        """Write a LoRA file that this backbone's pipeline loads with `load_lora_weights`."""


_REGISTRY: dict[str, type[ModelSpec]] = {}


def register_backbone(cls: type[ModelSpec]) -> type[ModelSpec]:
    _REGISTRY[cls.name] = cls
    return cls


def get_spec(backbone: str) -> ModelSpec:
    import happyhorse_train.models.happyhorse.spec  # noqa: F401  (registers itself)

    if backbone not in _REGISTRY:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[backbone]()
