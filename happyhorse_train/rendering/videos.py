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


def render_prompts(pipe, prompts: list[str], settings, image=None) -> np.ndarray:
    """Videos for `prompts`, as sample.py and validation both render them: `settings` carries
    negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
    max_sequence_length and seed (the generator is a fresh CPU one, so results do not depend on device).
    `image`: the first frame, for an image-to-video model."""
    import torch

    return pipe(
        **({"image": image} if image is not None else {}),
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


def condition_images(spec, transformer, paths: list[str], prompts: int, option: str) -> list | None:
    """The first-frame images (PIL) of an image-to-video model, one per prompt (or one for all), or None for a
    text-to-video model; one line when the model and `option` (the setting that names them) disagree."""
    from PIL import Image, UnidentifiedImageError

    from happyhorse_train.errors import UserInputError

    conditioning = spec.image_conditioning(transformer)
    if conditioning is None and paths:
        raise UserInputError(f"{option} given, but this {spec.name} model is text-to-video: leave {option} out")
    if conditioning is None:
        return None
    if len(paths) not in (1, prompts):
        raise UserInputError(f"this model is image-to-video ({conditioning}): give {option}=PATH, its first frame "
                             f"({len(paths)} given for {prompts} prompt(s): give one, or one per prompt)")
    images = []
    for path in paths:
        try:
            with Image.open(path) as opened:
                images.append(opened.convert("RGB"))
        except (OSError, UnidentifiedImageError) as error:
            raise UserInputError(f"{option}: {path} is not a readable image ({error})") from error
    return images * prompts if len(images) == 1 else images


def render_conditioned(pipe, prompts: list[str], settings, images: list | None) -> np.ndarray:
    """`render_prompts`, each prompt with its own first-frame image when there are images."""
    if images is None:
        return render_prompts(pipe, prompts, settings)
    return np.concatenate([render_prompts(pipe, [prompt], settings, image) for prompt, image in zip(prompts, images)])
