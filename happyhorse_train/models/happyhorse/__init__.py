"""HappyHorse-1.0: the transformer, its pipeline, and loading a model folder."""

from __future__ import annotations

from pathlib import Path

import torch

from happyhorse_train.models.happyhorse.pipeline import HappyHorsePipeline, HappyHorsePipelineOutput
from happyhorse_train.models.happyhorse.transformer import HappyHorseTransformer3DModel
from happyhorse_train.models.layout import check_model_folder

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def load_pipeline(path: str | Path, device: torch.device, dtype: torch.dtype) -> HappyHorsePipeline:
    """Load a HappyHorse diffusers-layout folder; the VAE stays float32 (its decode is sensitive to precision)."""
    folder = check_model_folder(path, "HappyHorsePipeline", COMPONENTS)
    pipe = HappyHorsePipeline.from_pretrained(folder, dtype={"default": dtype, "vae": torch.float32})
    return pipe.to(device)


__all__ = ["HappyHorsePipeline", "HappyHorsePipelineOutput", "HappyHorseTransformer3DModel", "load_pipeline"]
