"""What the cache stores for a backbone with a Wan-style VAE: latent mean and std per clip, text states per caption."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from happyhorse_train.models.component_id import component_id


class VaeClipEncoder(ABC):
    """Encodes pixels with the pipeline's VAE; subclasses encode captions the way their pipeline does.

    `video_id` / `text_id` name the exact components (and settings) so cache keys change when they do.
    """

    def __init__(self, pipe, model_folder: str | Path, max_sequence_length: int):
        folder = Path(model_folder)
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.video_id = f"vae:{component_id(folder / 'vae')}"
        self.text_id = (
            f"text:{component_id(folder / 'text_encoder')}:{component_id(folder / 'tokenizer')}:{max_sequence_length}"
        )

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels (3, T, H, W) in [-1, 1] -> the latent distribution's mean and std, (C, T', H', W') each.

        Stored un-normalized and un-sampled: training draws mean + std * noise afresh every time it sees the clip.
        """
        vae = self.pipe.vae
        dist = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist
        return {"mean": dist.mean[0].float(), "std": dist.std[0].float()}

    @abstractmethod
    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Each caption's text-encoder states, trimmed to its own tokens: {"text": (tokens, text_dim)}."""
