"""A contact sheet: videos as rows of evenly spaced frames in one PNG, to compare samples at a glance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from happyhorse_train.data.cache_fill import clip_pixels
from happyhorse_train.data.prepare import load_manifest
from happyhorse_train.files import write_atomic
from happyhorse_train.rendering.videos import prompt_slug, unused_path

LABEL_HEIGHT = 14


def training_clip(dataset: str | Path, caption: str) -> np.ndarray | None:
    """The first clip of a dataset folder captioned exactly `caption`, as (T, H, W, 3) floats in [0, 1]; else None."""
    for row in load_manifest(dataset):
        if row["caption"].strip() == caption.strip():
            return ((clip_pixels(row).permute(1, 2, 3, 0).numpy() + 1) / 2).clip(0, 1)
    return None


def write_contact_sheet(rows: list[tuple[str, np.ndarray]], path: str | Path, columns: int = 6) -> Path:
    """One labelled row per (label, video of (T, H, W, 3) floats in [0, 1]); `columns` frames from first to last.

    Rows of other sizes are scaled to the first row's frame height.
    """
    height = rows[0][1].shape[1]
    strips = []
    for label, video in rows:
        picks = np.linspace(0, len(video) - 1, columns).round().astype(int)
        frames = [Image.fromarray((video[i] * 255).round().astype(np.uint8)) for i in picks]
        frames = [f.resize((round(f.width * height / f.height), height)) for f in frames]
        strip = Image.new("RGB", (sum(f.width for f in frames) + 2 * (columns - 1), height + LABEL_HEIGHT), "white")
        ImageDraw.Draw(strip).text((2, 1), label, fill="black")
        for index, frame in enumerate(frames):
            strip.paste(frame, (index * (frame.width + 2), LABEL_HEIGHT))
        strips.append(strip)
    sheet = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), "white")
    for index, strip in enumerate(strips):
        sheet.paste(strip, (0, sum(s.height for s in strips[:index])))
    path = Path(path)
    write_atomic(path, lambda temporary: sheet.save(temporary, format="PNG"))
    return path


def write_lora_sheets(prompts: list[str], base: np.ndarray, with_loras: np.ndarray, folder: str | Path,
                      dataset: str | Path | None = None) -> list[Path]:
    """Per prompt, `<index>_<prompt>_sheet.png`: its training clip (when `dataset` has one with that caption),
    the base model's sample and the sample with the LoRAs, same seed."""
    paths = []
    for index, prompt in enumerate(prompts):
        rows = [("base model", base[index]), ("with the LoRA", with_loras[index])]
        clip = training_clip(dataset, prompt) if dataset else None
        if clip is not None:
            rows.insert(0, ("training clip", clip))
        paths.append(write_contact_sheet(rows, unused_path(Path(folder), f"{index:02d}_{prompt_slug(prompt)}_sheet",
                                                           ".png")))
    return paths
