"""Validation samples: the user's pipeline, the live weights, a fixed seed."""

from __future__ import annotations

from pathlib import Path

import torch

from happyhorse_train.rendering.videos import render_conditioned, save_videos


@torch.no_grad()
def render_validation(pipe, cfg, folder: Path, autocast, images: list | None = None) -> list[Path]:
    """Render `cfg.prompts` with `pipe` into mp4 files under `folder`.

    The transformer is switched to eval (LoRA dropout off) and back. The generator is a fresh one from
    `cfg.seed`, and nothing touches the global random state, so validating does not change training.
    `images`: each prompt's first frame, for an image-to-video model (rendering.videos.condition_images).
    """
    transformer = pipe.transformer
    was_training = transformer.training
    transformer.eval()
    try:
        with autocast():
            videos = render_conditioned(pipe, list(cfg.prompts), cfg, images)
    finally:
        transformer.train(was_training)
    return save_videos(videos, list(cfg.prompts), folder, fps=24)
