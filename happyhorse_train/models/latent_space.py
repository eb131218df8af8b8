"""VAE latents <-> the unit-scale space a transformer denoises in, from the VAE config's per-channel statistics
(`latents_mean`, `latents_std`, as diffusers' AutoencoderKLWan configs carry them)."""

from __future__ import annotations

import torch


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1, 1)
    # Built on the host and queued to the device: `torch.tensor(list, device=cuda)` would wait for the GPU.
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape).to(like.device, non_blocking=True)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape).to(like.device, non_blocking=True)
    return mean, std


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """(z - mean) / std per channel, computed in float32, returned in the input's dtype."""
    mean, std = _stats(vae, latents)
    return ((latents.float() - mean) / std).to(latents.dtype)


def mode_latents(vae, video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) pixels, on the device the VAE runs on -> the normalized latents of the VAE's mode (no
    sampling): how the pipelines encode their condition image, and so how the cache encodes it. (Under model CPU
    offload the VAE is moved only as it runs, so the caller places the pixels.)"""
    latent = vae.encode(video.to(dtype=vae.dtype)).latent_dist.mode()
    return normalize_latents(vae, latent.float())


def denormalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(vae, latents)
    return (latents.float() * std + mean).to(latents.dtype)
