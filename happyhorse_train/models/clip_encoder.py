"""What the cache stores for a backbone with a Wan-style VAE: latent mean and std per clip (and what an
image-to-video pipeline makes of its condition image), text states per caption."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from happyhorse_train.models.component_id import component_id
from happyhorse_train.models.latent_space import mode_latents

FIRST_FRAME = "first_frame"  # the image's clean latent as latent frame 0 (HappyHorse, Wan 2.2 TI2V)


def condition_image(pixels: torch.Tensor, first_frame: torch.Tensor | None) -> torch.Tensor:
    """The image a clip is conditioned on, (3, H, W): its first-frame image when it has one, else its frame 0."""
    return pixels[:, 0] if first_frame is None else first_frame.to(pixels)


class VaeClipEncoder(ABC):
    """Encodes pixels with the pipeline's VAE; subclasses encode captions the way their pipeline does.

    `video_id` / `text_id` name the exact components (and settings) so cache keys change when they do. With
    `conditioning` (the spec's `image_conditioning`), entries also hold what the pipeline makes of the image.
    """

    def __init__(self, pipe, model_folder: str | Path, max_sequence_length: int, conditioning: str | None = None):
        folder = Path(model_folder)
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.conditioning = conditioning
        self.video_id = f"vae:{component_id(folder / 'vae')}"
        if conditioning is not None:
            self.video_id += f":{conditioning}"
        self.text_id = (
            f"text:{component_id(folder / 'text_encoder')}:{component_id(folder / 'tokenizer')}:{max_sequence_length}"
        )

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor, first_frame: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """pixels (3, T, H, W) in [-1, 1] -> the latent distribution's mean and std, (C, T', H', W') each.

        Stored un-normalized and un-sampled: training draws mean + std * noise afresh every time it sees the clip.
        For `first_frame` conditioning also "first_latents", (C, 1, H', W'): the condition image (`first_frame`,
        (3, H, W), else the clip's frame 0) encoded alone, as the pipeline encodes its image.
        """
        vae = self.pipe.vae
        dist = vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist
        entry = {"mean": dist.mean[0].float(), "std": dist.std[0].float()}
        if self.conditioning == FIRST_FRAME:
            entry["first_latents"] = self.condition_latents(condition_image(pixels, first_frame)[:, None])[0]
        return entry

    @torch.no_grad()
    def condition_latents(self, video: torch.Tensor) -> torch.Tensor:
        """(3, T, H, W) pixels -> (1, C, T', H', W'), as the pipelines encode their condition image."""
        return mode_latents(self.pipe.vae, video[None].to(self.pipe.vae.device))

    @abstractmethod
    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Each caption's text-encoder states, trimmed to its own tokens: {"text": (tokens, text_dim)}."""
