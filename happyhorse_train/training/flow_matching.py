"""Rectified-flow training math. sigma in [0, 1]: 0 is clean data, 1 pure noise.

x_t = (1 - sigma) * x0 + sigma * noise, and the model predicts the velocity noise - x0. The transformer
takes timesteps = sigma * 1000. All randomness comes from a passed torch.Generator, never the global RNG,
so a run draws the same values again after a resume.
"""

from __future__ import annotations

import math

import torch

SIGMA_SAMPLING = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTING = ("none", "cosmap", "sigma_sqrt")
MAX_SIGMA_SQRT_WEIGHT = 1e4


def sample_sigmas(
    batch_size: int,
    scheme: str,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Training noise levels, shape (batch_size,), float32, drawn only from `generator`."""
    if scheme not in SIGMA_SAMPLING:
        raise ValueError(f"unknown sigma sampling {scheme!r}; use one of {', '.join(SIGMA_SAMPLING)}")
    # Drawn on the generator's own device: torch refuses a generator from another device.
    where, dtype = generator.device, torch.float32
    if scheme == "uniform":
        sigmas = torch.rand(batch_size, generator=generator, device=where, dtype=dtype)
    elif scheme == "logit_normal":
        normal = torch.randn(batch_size, generator=generator, device=where, dtype=dtype)
        sigmas = torch.sigmoid(logit_mean + logit_std * normal)
    else:  # "mode" (SD3): mode_scale 0 is uniform; larger values put more mass mid-way
        u = torch.rand(batch_size, generator=generator, device=where, dtype=dtype)
        sigmas = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return sigmas if device is None else sigmas.to(device)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """shift * s / (1 + (shift - 1) * s): identity at 1, keeps 0 and 1 fixed; > 1 moves mass toward noise."""
    if shift <= 0:
        raise ValueError(f"shift={shift} must be > 0")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift(
    num_tokens: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_tokens: int = 256,
    max_tokens: int = 4096,
) -> float:
    """exp(mu), mu linear in the token count through (base_tokens, base_shift) and (max_tokens, max_shift)
    (Flux / SD3), held at the nearer end outside them. More tokens -> larger shift: longer sequences keep more
    structure at a given noise level, so they need more training at high noise."""
    if max_tokens == base_tokens:
        raise ValueError(f"base_tokens and max_tokens are both {base_tokens}; the line through them is undefined")
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    mu = base_shift + slope * (num_tokens - base_tokens)
    # Clamped to the two given points rather than capped by another setting: extrapolated, the line runs away on
    # video (720x480x121 on the 8b is 41,850 tokens: shift ~1880, 99.8 % of sigmas above 0.99), and the points
    # already say the largest shift wanted; a user who wants more for video moves max_tokens / max_shift.
    low, high = sorted((base_shift, max_shift))
    return math.exp(min(max(mu, low), high))


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(batch,) -> (batch, 1, 1, ...) so it broadcasts over `like`'s non-batch dims."""
    if sigmas.shape != like.shape[:1]:
        raise ValueError(f"expected one sigma per sample, shape ({like.shape[0]},); got {tuple(sigmas.shape)}")
    return sigmas.view(-1, *([1] * (like.dim() - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise, in x0's dtype."""
    # Mixed in float32: a bf16 sigma would be rounded away from the timestep the model is told.
    s = _per_sample(sigmas.float(), x0)
    return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d sigma: what the model is trained to predict."""
    return noise - x0


def loss_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weights, shape (batch,)."""
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    if scheme == "sigma_sqrt":
        return (sigmas**-2).clamp(max=MAX_SIGMA_SQRT_WEIGHT)  # capped: infinite at sigma 0
    raise ValueError(f"unknown loss weighting {scheme!r}; use one of {', '.join(LOSS_WEIGHTING)}")


def squared_errors(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample mean squared error over the non-batch dims, in float32, shape (batch,). With a `mask`
    (broadcast over the channels: (batch, 1, T, H, W)), the mask-weighted mean: elements where it is 0 add
    nothing, and a sample masked out entirely has error 0."""
    squared = (prediction.float() - target.float()).square()
    if mask is None:
        return squared.flatten(1).mean(1)
    weights = mask.to(squared).expand_as(squared)
    return (squared * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(1e-12)


def weighted_mean(errors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample errors, weighted, averaged over the batch: the training loss."""
    return (weights.float() * errors).mean()


def timesteps_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep input (float, 0..1000)."""
    return sigmas * 1000.0
