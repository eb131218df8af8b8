"""HappyHorse-1.0: the transformer, its pipeline, and loading a model folder."""

from __future__ import annotations

from pathlib import Path

import torch

from happyhorse_train.models.happyhorse.pipeline import HappyHorsePipeline, HappyHorsePipelineOutput
from happyhorse_train.models.happyhorse.transformer import HappyHorseTransformer3DModel


def load_pipeline(path: str | Path, device: torch.device, dtype: torch.dtype) -> HappyHorsePipeline:
    """Load a HappyHorse diffusers-layout folder; the VAE stays float32 (its decode is sensitive to precision)."""
    from happyhorse_train.models.happyhorse.spec import HappyHorseSpec

    return HappyHorseSpec().load_pipeline(path, device, dtype)


__all__ = ["HappyHorsePipeline", "HappyHorsePipelineOutput", "HappyHorseTransformer3DModel", "load_pipeline"]
