"""Synthetic demo clips: a coloured shape moving over a dark background, captioned with what it shows.

Real mp4 files (H.264, 24 fps) with a sidecar .txt caption each, so the data tools read them the way
they read a user's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from diffusers.utils import export_to_video

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}


@dataclass(frozen=True)
class ClipRecipe:
    name: str
    shape: str  # circle | square
    colour: str  # a key of COLOURS
    motion: str  # left_to_right | top_to_bottom | orbit
    width: int = 144
    height: int = 96
    num_frames: int = 48

    @property
    def caption(self) -> str:
        motion = {"left_to_right": "moving left to right", "top_to_bottom": "moving top to bottom",
                  "orbit": "orbiting the centre"}
        return f"a {self.colour} {self.shape} {motion[self.motion]} on a dark background"


DEMO_CLIPS = [
    ClipRecipe("red_circle_right", "circle", "red", "left_to_right"),
    ClipRecipe("blue_square_down", "square", "blue", "top_to_bottom"),
    ClipRecipe("green_circle_orbit", "circle", "green", "orbit"),
    ClipRecipe("yellow_square_right", "square", "yellow", "left_to_right"),
    ClipRecipe("red_square_orbit", "square", "red", "orbit"),
    ClipRecipe("blue_circle_down_portrait", "circle", "blue", "top_to_bottom", width=96, height=144),
]


def _centre(recipe: ClipRecipe, progress: float) -> tuple[float, float]:
    w, h = recipe.width, recipe.height
    if recipe.motion == "left_to_right":
        return 0.15 * w + 0.7 * w * progress, 0.5 * h
    if recipe.motion == "top_to_bottom":
        return 0.5 * w, 0.15 * h + 0.7 * h * progress
    angle = 2 * np.pi * progress
    return 0.5 * w + 0.3 * w * np.cos(angle), 0.5 * h + 0.3 * h * np.sin(angle)


def render_clip(recipe: ClipRecipe) -> list[np.ndarray]:
    """Frames as float (height, width, 3) arrays in [0, 1]."""
    ys, xs = np.mgrid[0 : recipe.height, 0 : recipe.width].astype(np.float32)
    radius = 0.12 * min(recipe.width, recipe.height)
    colour = np.array(COLOURS[recipe.colour], dtype=np.float32)
    background = np.full((recipe.height, recipe.width, 3), 0.08, dtype=np.float32)
    frames = []
    for index in range(recipe.num_frames):
        cx, cy = _centre(recipe, index / max(recipe.num_frames - 1, 1))
        if recipe.shape == "circle":
            inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
        else:
            inside = (np.abs(xs - cx) <= radius) & (np.abs(ys - cy) <= radius)
        frame = background.copy()
        frame[inside] = colour
        frames.append(frame)
    return frames


def write_clip(recipe: ClipRecipe, folder: Path, fps: int = 24) -> Path:
    path = folder / f"{recipe.name}.mp4"
    export_to_video(render_clip(recipe), str(path), fps=fps)
    (folder / f"{recipe.name}.txt").write_text(recipe.caption + "\n", encoding="utf-8")
    return path


def write_demo_clips(folder: str | Path, recipes: list[ClipRecipe] = DEMO_CLIPS) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_clip(recipe, folder) for recipe in recipes]
