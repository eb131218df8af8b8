"""A clip's first-frame image, for image-to-video training: `clip.first.png` (or .jpg, .jpeg, .webp, .bmp) beside
`clip.mp4` is the image the clip opens on, the condition in place of the clip's own frame 0 (a clean still for a
clip that fades in, a photo its video was made from). It is resized to cover the clip's bucket and centre-cropped,
as the clip's frames are; a text-to-video model ignores it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from happyhorse_train.data.video import IMAGE_SUFFIXES, find_sidecar, load_clip

if TYPE_CHECKING:
    import torch

FIRST_FRAME_TAG = ".first"  # clip.mp4 -> clip.first.png


def is_first_frame_file(path: Path) -> bool:
    return path.stem.endswith(FIRST_FRAME_TAG) and path.suffix.lower() in IMAGE_SUFFIXES


def find_first_frame(media: Path) -> Path | None:
    """The first-frame image beside a media file, if it has one."""
    return find_sidecar(media, FIRST_FRAME_TAG, IMAGE_SUFFIXES)


def first_frame_pixels(row: dict) -> torch.Tensor | None:
    """A manifest row's first-frame image at its bucket size, (3, H, W) in [-1, 1]; None when it has none."""
    if not row.get("first_frame"):
        return None
    return load_clip(Path(row["first_frame"]), [0], row["bucket_height"], row["bucket_width"])[:, 0]
