"""Writing rendered videos to disk: mp4 files named after their prompt, never overwriting one that exists."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from diffusers.utils import export_to_video


def prompt_slug(prompt: str, max_length: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")
    return slug[:max_length].rstrip("_") or "video"


def unused_path(folder: Path, stem: str, suffix: str = ".mp4") -> Path:
    """folder/stem.mp4, or folder/stem-2.mp4, -3, ... if taken."""
    candidate, index = folder / f"{stem}{suffix}", 2
    while candidate.exists():
        candidate, index = folder / f"{stem}-{index}{suffix}", index + 1
    return candidate


def save_videos(videos: np.ndarray, prompts: list[str], folder: str | Path, fps: int, tag: str = "") -> list[Path]:
    """videos: (batch, frames, height, width, 3) floats in [0, 1], one per prompt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (video, prompt) in enumerate(zip(videos, prompts)):
        path = unused_path(folder, f"{index:02d}_{prompt_slug(prompt)}{tag}")
        export_to_video(list(video), str(path), fps=fps)
        paths.append(path)
    return paths


def render_prompts(pipe, prompts: list[str], settings) -> np.ndarray:
    """Videos for `prompts`, as sample.py and validation both render them: `settings` carries
    negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
    max_sequence_length and seed (the generator is a fresh CPU one, so results do not depend on device)."""
    import torch

    return pipe(
        prompt=list(prompts),
        negative_prompt=settings.negative_prompt,
        height=settings.height,
        width=settings.width,
        num_frames=settings.num_frames,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        max_sequence_length=settings.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(settings.seed),
    ).frames
