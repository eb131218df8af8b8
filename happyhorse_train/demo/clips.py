"""Synthetic demo clips: a coloured shape moving over a background, captioned with what it shows.

Real mp4 files (H.264, 24 fps) with a sidecar .txt caption each, so the data tools read them the way
they read a user's folder. `draw_frames` is also what the demo VAE learns to reconstruct (demo/autoencoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from diffusers.utils import export_to_video

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
# Each background as (top colour, bottom colour): a vertical gradient, flat when both are the same.
BACKGROUNDS = {
    "dark": ((0.08, 0.08, 0.08), (0.08, 0.08, 0.08)),
    "white": ((0.92, 0.92, 0.92), (0.92, 0.92, 0.92)),
    "sky-blue": ((0.35, 0.6, 0.95), (0.85, 0.92, 1.0)),
    "grassy green": ((0.55, 0.8, 0.45), (0.15, 0.45, 0.12)),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"left_to_right": "moving left to right", "top_to_bottom": "moving top to bottom",
           "orbit": "orbiting the centre", "growing": "growing at the centre"}


@dataclass(frozen=True)
class ClipRecipe:
    name: str
    shape: str  # a member of SHAPES
    colour: str  # a key of COLOURS
    motion: str  # a key of MOTIONS
    background: str = "dark"  # a key of BACKGROUNDS
    width: int = 144
    height: int = 96
    num_frames: int = 48

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} {MOTIONS[self.motion]} on a {self.background} background"


DEMO_CLIPS = [
    ClipRecipe("red_circle_right", "circle", "red", "left_to_right"),
    ClipRecipe("blue_square_down", "square", "blue", "top_to_bottom", "white"),
    ClipRecipe("yellow_triangle_orbit", "triangle", "yellow", "orbit", "sky-blue"),
    ClipRecipe("red_square_growing", "square", "red", "growing", "grassy green"),
    ClipRecipe("green_circle_orbit", "circle", "green", "orbit", "white"),
    ClipRecipe("yellow_circle_down_portrait", "circle", "yellow", "top_to_bottom", "dark", width=96, height=144),
]


def gradient(top, bottom, height: int, width: int) -> np.ndarray:
    """A (height, width, 3) float32 image fading from `top` to `bottom` colour."""
    mix = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    row = (1 - mix) * np.asarray(top, np.float32) + mix * np.asarray(bottom, np.float32)
    return np.broadcast_to(row, (height, width, 3)).copy()


def shape_mask(shape: str, height: int, width: int, cx: float, cy: float, radius: float) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    if shape == "square":
        return (np.abs(xs - cx) <= radius) & (np.abs(ys - cy) <= radius)
    # An upright triangle: apex above the centre, base below it, as wide as it is tall.
    top, bottom = cy - radius, cy + radius
    half_width = radius * (ys - top) / (2 * radius)
    return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half_width)


def draw_frames(shape: str, colour, background: np.ndarray, path: list[tuple[float, float, float]]) -> list[np.ndarray]:
    """One frame per (cx, cy, radius) of `path`: the shape in `colour` over `background`, floats in [0, 1]."""
    height, width = background.shape[:2]
    frames = []
    for cx, cy, radius in path:
        frame = background.copy()
        frame[shape_mask(shape, height, width, cx, cy, radius)] = colour
        frames.append(frame)
    return frames


def _path(recipe: ClipRecipe) -> list[tuple[float, float, float]]:
    w, h, small = recipe.width, recipe.height, min(recipe.width, recipe.height)
    path = []
    for index in range(recipe.num_frames):
        progress = index / max(recipe.num_frames - 1, 1)
        radius = 0.12 * small
        if recipe.motion == "left_to_right":
            cx, cy = 0.15 * w + 0.7 * w * progress, 0.5 * h
        elif recipe.motion == "top_to_bottom":
            cx, cy = 0.5 * w, 0.15 * h + 0.7 * h * progress
        elif recipe.motion == "orbit":
            angle = 2 * np.pi * progress
            cx, cy = 0.5 * w + 0.3 * w * np.cos(angle), 0.5 * h + 0.3 * h * np.sin(angle)
        else:  # growing
            cx, cy, radius = 0.5 * w, 0.5 * h, (0.05 + 0.3 * progress) * small
        path.append((cx, cy, radius))
    return path


def render_clip(recipe: ClipRecipe) -> list[np.ndarray]:
    """Frames as float (height, width, 3) arrays in [0, 1]."""
    background = gradient(*BACKGROUNDS[recipe.background], recipe.height, recipe.width)
    return draw_frames(recipe.shape, np.asarray(COLOURS[recipe.colour], np.float32), background, _path(recipe))


def write_clip(recipe: ClipRecipe, folder: Path, fps: int = 24) -> Path:
    path = folder / f"{recipe.name}.mp4"
    export_to_video(render_clip(recipe), str(path), fps=fps)
    (folder / f"{recipe.name}.txt").write_text(recipe.caption + "\n", encoding="utf-8")
    return path


def write_demo_clips(folder: str | Path, recipes: list[ClipRecipe] = DEMO_CLIPS) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_clip(recipe, folder) for recipe in recipes]
