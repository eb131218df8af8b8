"""The demo's VAE: the tiny preset's AutoencoderKLWan, trained here to reconstruct synthetic clips faithfully.

A random VAE turns every clip into noise to the eye, so nothing a demo trains could be seen. This one is
trained on random scenes (any colour, shape, motion and background; never the demo clips themselves) by
`data_tools/train_demo_vae.py`, whose output is committed in `tiny_vae/` (a diffusers folder, under 1 MB).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from tqdm.auto import tqdm

from happyhorse_train.demo.clips import BACKGROUNDS, COLOURS, SHAPES, draw_frames, gradient, render_clip
from happyhorse_train.errors import UserInputError

TRAINED_VAE = Path(__file__).parent / "tiny_vae"


def random_scene(rng: np.random.Generator, num_frames: int, height: int, width: int) -> np.ndarray:
    """(num_frames, height, width, 3) floats in [0, 1]: a shape moving (and growing or shrinking) over a gradient.

    Half the scenes use the demo's own colours and backgrounds, half any colours at all.
    """
    if rng.random() < 0.5:
        background = gradient(*BACKGROUNDS[rng.choice(list(BACKGROUNDS))], height, width)
        colour = np.asarray(COLOURS[rng.choice(list(COLOURS))], np.float32)
    else:
        background, colour = gradient(rng.random(3), rng.random(3), height, width), rng.random(3)
    start, end = rng.random(2) * [width, height], rng.random(2) * [width, height]
    radii = np.linspace(*rng.uniform(4.0, 30.0, 2), num_frames)  # in pixels, as the demo clips' shapes are
    path = []
    for index, radius in enumerate(radii):
        progress = index / max(num_frames - 1, 1)
        cx, cy = (1 - progress) * start + progress * end
        path.append((cx, cy, radius))
    return np.stack(draw_frames(str(rng.choice(SHAPES)), colour, background, path))


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) in [0, 1] -> (3, T, H, W) in [-1, 1], the VAE's input."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() * 2 - 1


def _vae_loss(vae: AutoencoderKLWan, pixels: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, float]:
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    mse = torch.nn.functional.mse_loss(reconstruction, pixels)
    return mse + kl_weight * posterior.kl().mean() / posterior.mean[0].numel(), mse.item()


@torch.no_grad()
def narrow_posterior(vae: AutoencoderKLWan) -> None:
    """Start from a narrow posterior: a random one's std (~1) would drown its means (~0.2)."""
    z_dim = vae.config.z_dim
    vae.quant_conv.weight[z_dim:] = 0.0
    vae.quant_conv.bias[z_dim:] = -8.0


def train_vae(vae: AutoencoderKLWan, steps: int, seed: int = 0, batch_size: int = 4, num_frames: int = 5,
              size: tuple[int, int] = (48, 64), lr: float = 3e-3, kl_weight: float = 1e-3) -> list[float]:
    """Train in place on fresh random scenes every step (cosine learning rate); returns each step's pixel MSE."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    vae.train()
    errors = []
    for _ in (bar := tqdm(range(steps), desc="training the demo VAE", unit="step", mininterval=10)):
        pixels = torch.stack([to_pixels(random_scene(rng, num_frames, *size)) for _ in range(batch_size)])
        loss, mse = _vae_loss(vae, pixels, kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        errors.append(mse)
        bar.set_postfix(mse=f"{np.mean(errors[-50:]):.4f}", refresh=False)
    vae.eval()
    return errors


@torch.no_grad()
def measure(vae: AutoencoderKLWan, recipes) -> dict:
    """Per-channel latent statistics over the clips, and the reconstruction error next to the clips' own variance.

    Errors are in [0, 1] pixel units, of the posterior mean decoded, over each clip's first 17 frames.
    """
    means, errors, variances = [], [], []
    for recipe in recipes:
        frames = np.stack(render_clip(recipe)[:17])
        pixels = to_pixels(frames)[None]
        mean = vae.encode(pixels).latent_dist.mean
        reconstruction = (vae.decode(mean).sample.clamp(-1, 1) + 1) / 2
        errors.append(((reconstruction - (pixels + 1) / 2) ** 2).mean().item())
        variances.append(float(frames.var()))
        means.append(mean[0].flatten(1))
    latents = torch.cat(means, dim=1)
    return {"latents_mean": latents.mean(1).tolist(), "latents_std": latents.std(1).tolist(),
            "reconstruction_mse": float(np.mean(errors)), "pixel_variance": float(np.mean(variances))}


def load_trained_vae(vae_arguments: dict) -> AutoencoderKLWan:
    """The committed demo VAE, checked to be the size the preset asks for."""
    vae = AutoencoderKLWan.from_pretrained(TRAINED_VAE, torch_dtype=torch.float32)
    different = {key: (value, vae.config[key]) for key, value in vae_arguments.items() if vae.config[key] != value}
    if different:
        raise UserInputError(f"the trained demo VAE ({TRAINED_VAE}) was trained at other sizes than this preset's "
                         f"(preset, trained): {different}; make the demo with --random-vae")
    return vae.eval()
