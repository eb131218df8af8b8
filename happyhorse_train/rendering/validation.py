"""Validation samples: the user's pipeline, the live weights, a fixed seed."""

from __future__ import annotations

from pathlib import Path

import torch

from happyhorse_train.rendering.videos import render_prompts, save_videos


@torch.no_grad()
def render_validation(pipe, cfg, folder: Path, autocast) -> list[Path]:
    """Render `cfg.prompts` with `pipe` into mp4 files under `folder`.

    The transformer is switched to eval (LoRA dropout off) and back. The generator is a fresh one from
    `cfg.seed`, and nothing touches the global random state, so validating does not change training.
    """
    transformer = pipe.transformer
    was_training = transformer.training
    transformer.eval()
    try:
        with autocast():
            videos = render_prompts(pipe, list(cfg.prompts), cfg)
    finally:
        transformer.train(was_training)
    return save_videos(videos, list(cfg.prompts), folder, fps=24)
