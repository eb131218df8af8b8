"""What the cache stores for HappyHorse: VAE latent mean and std per clip, text-encoder states per caption."""

from __future__ import annotations

from pathlib import Path

import torch

from happyhorse_train.models.component_id import component_id
from happyhorse_train.models.happyhorse.pipeline import HappyHorsePipeline


class HappyHorseClipEncoder:
    """Encodes pixels and captions with a pipeline's VAE and text encoder.

    `video_id` / `text_id` name the exact components (and settings) so cache keys change when they do.
    """

    def __init__(self, pipe: HappyHorsePipeline, model_folder: str | Path, max_sequence_length: int):
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

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Each caption's text-encoder states, trimmed to its own tokens: (tokens, text_dim)."""
        states, mask = self.pipe.encode_prompt(captions, self.max_sequence_length, self.pipe.text_encoder.device)
        return [{"text": s[: int(m.sum())].float()} for s, m in zip(states, mask)]
