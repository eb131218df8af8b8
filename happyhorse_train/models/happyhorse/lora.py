"""LoRA files for HappyHorsePipeline in the diffusers layout.

A file holds `transformer.<module path>.lora_A.weight` / `.lora_B.weight` tensors (peft names), and
diffusers' adapter metadata (rank, alpha, targets) in the safetensors header. Loading is local only:
a path that does not exist is an error, never a hub lookup.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders.lora_base import LoraBaseMixin

from happyhorse_train.models.lora_formats import check_lora_matches, read_lora_file, resolve_lora_file


def _read(given: str | Path | dict[str, torch.Tensor], weight_name: str | None):
    """(what to call it in a message, tensors, adapter metadata or None) of a path or a state dict."""
    if isinstance(given, dict):
        return "the given LoRA state dict", dict(given), None
    path = resolve_lora_file(given, weight_name)
    return (str(path), *read_lora_file(path))


class HappyHorseLoraLoaderMixin(LoraBaseMixin):
    """`load_lora_weights` / `save_lora_weights` for the pipeline's transformer.

    `set_adapters`, `fuse_lora`, `unfuse_lora`, `delete_adapters` and `disable_lora` come from
    diffusers' LoraBaseMixin and act on `_lora_loadable_modules`.
    """

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"

    @classmethod
    def lora_state_dict(
        cls,
        pretrained_model_name_or_path_or_dict: str | Path | dict[str, torch.Tensor],
        weight_name: str | None = None,
        return_lora_metadata: bool = False,
        **kwargs,
    ):
        _, state_dict, metadata = _read(pretrained_model_name_or_path_or_dict, weight_name)
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        **kwargs,
    ) -> None:
        source, state_dict, metadata = _read(pretrained_model_name_or_path_or_dict, kwargs.pop("weight_name", None))
        transformer = getattr(self, self.transformer_name)
        check_lora_matches(state_dict, transformer, source)
        transformer.load_lora_adapter(
            state_dict, prefix=self.transformer_name, adapter_name=adapter_name, metadata=metadata, _pipeline=self
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | Path,
        transformer_lora_layers: dict[str, torch.Tensor],
        transformer_lora_adapter_metadata: dict | None = None,
        weight_name: str | None = None,
        is_main_process: bool = True,
    ) -> None:
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers={cls.transformer_name: transformer_lora_layers},
            lora_metadata={cls.transformer_name: transformer_lora_adapter_metadata},
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=None,
            safe_serialization=True,
        )

    def fuse_lora(self, components: list[str] = ["transformer"], lora_scale: float = 1.0, **kwargs) -> None:  # noqa: B006
        super().fuse_lora(components=components, lora_scale=lora_scale, **kwargs)

    def unfuse_lora(self, components: list[str] = ["transformer"], **kwargs) -> None:  # noqa: B006
        super().unfuse_lora(components=components, **kwargs)

