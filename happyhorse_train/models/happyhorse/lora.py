"""LoRA files for HappyHorsePipeline in the diffusers layout.

A file holds `transformer.<module path>.lora_A.weight` / `.lora_B.weight` tensors (peft names), and
diffusers' adapter metadata (rank, alpha, targets) in the safetensors header. Loading is local only:
a path that does not exist is an error, never a hub lookup.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LoraBaseMixin

from happyhorse_train.errors import UserInputError
from happyhorse_train.models.lora_formats import LORA_WEIGHT_NAME, check_lora_matches


def resolve_lora_file(path: str | Path, weight_name: str | None = None) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / (weight_name or LORA_WEIGHT_NAME)
    if not path.is_file():
        raise UserInputError(f"LoRA file not found: {path}")
    return path


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The tensors and diffusers' adapter metadata (None when the file has none)."""
    try:
        state_dict = safetensors.torch.load_file(path, device="cpu")
        with safetensors.safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
    except (safetensors.SafetensorError, OSError) as error:
        raise UserInputError(f"{path} is not a readable safetensors LoRA file ({error})") from error
    raw = header.get(LORA_ADAPTER_METADATA_KEY)
    return state_dict, (json.loads(raw) if raw else None)


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
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            state_dict, metadata = dict(pretrained_model_name_or_path_or_dict), None
        else:
            path = resolve_lora_file(pretrained_model_name_or_path_or_dict, weight_name)
            state_dict, metadata = read_lora_file(path)
        return (state_dict, metadata) if return_lora_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        **kwargs,
    ) -> None:
        source = (
            "the given LoRA state dict"
            if isinstance(pretrained_model_name_or_path_or_dict, dict)
            else str(pretrained_model_name_or_path_or_dict)
        )
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, weight_name=kwargs.pop("weight_name", None),
            return_lora_metadata=True,
        )
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

