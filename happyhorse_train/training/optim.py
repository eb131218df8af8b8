"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "adamw8bit")  # torch's, bitsandbytes' 8-bit states


def build_optimizer(parameters: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, **kwargs)
    # One fused kernel over all parameters instead of a chain of foreach kernels (CUDA and CPU both have it).
    fused = all(p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for p in parameters)
    return torch.optim.AdamW(parameters, fused=fused, **kwargs)


# optimizer.scheduler's values, and diffusers' names for them (each warms up over optimizer.warmup_steps)
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def build_lr_schedule(optimizer: torch.optim.Optimizer, cfg, max_steps: int):
    from diffusers.optimization import get_scheduler  # (here: config_checks reads SCHEDULES, and fails fast)

    return get_scheduler(
        SCHEDULES[cfg.scheduler], optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps
    )
