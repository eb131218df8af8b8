"""Reading videos (decord) and still images (PIL): probing, and loading one clip as model-ready pixels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_CHUNK = 32  # frames decoded per call while counting


class UnreadableMedia(Exception):
    """The file cannot be decoded; the message says why, for the drop report."""


@dataclass(frozen=True)
class MediaInfo:
    num_frames: int  # frames that actually decode (1 for a still image)
    fps: float  # 0.0 for a still image
    width: int
    height: int

    @property
    def is_still(self) -> bool:
        return self.fps == 0.0


def _open_video(path: Path, width: int = -1, height: int = -1):
    import decord

    if path.stat().st_size == 0:
        raise UnreadableMedia("empty file (0 bytes)")
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height, num_threads=1)
    except Exception as error:  # decord raises its own DECORDError and RuntimeError variants
        raise UnreadableMedia(f"cannot open as video: {_first_line(error)}") from error


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def count_decodable_frames(reader) -> int:
    """Decode the video front to back and count the frames that decode; a truncated tail stops the count."""
    total = len(reader)
    for start in range(0, total, _CHUNK):
        stop = min(start + _CHUNK, total)
        try:
            reader.get_batch(list(range(start, stop)))
        except Exception:
            for index in range(start, stop):  # find the first frame that fails inside this chunk
                try:
                    reader.get_batch([index])
                except Exception:
                    return index
    return total


def probe(path: Path) -> MediaInfo:
    """Frame count (decoded, not estimated from duration), fps and size of a video or still image."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise UnreadableMedia(f"cannot open as image: {_first_line(error)}") from error
        return MediaInfo(1, 0.0, width, height)

    reader = _open_video(path)
    try:
        height, width = reader[0].shape[:2]
    except Exception as error:
        raise UnreadableMedia(f"the first frame does not decode: {_first_line(error)}") from error
    fps = float(reader.get_avg_fps())
    del reader
    # Count on a small decode size: the codec still decodes every frame, but the colour conversion is cheap.
    frames = count_decodable_frames(_open_video(path, width=64, height=64))
    if frames == 0:
        raise UnreadableMedia("no frame decodes")
    if not fps > 0:
        raise UnreadableMedia(f"no usable frame rate (container says {fps})")
    return MediaInfo(frames, fps, width, height)


def resize_and_crop(frames: np.ndarray, height: int, width: int):
    """(T, H, W, 3) uint8 -> (3, T, height, width) float in [-1, 1]: scale to cover, then centre-crop."""
    import torch
    import torch.nn.functional as F

    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W)
    src_h, src_w = video.shape[-2:]
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    if (new_h, new_w) != (src_h, src_w):
        video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    video = video[:, :, top : top + height, left : left + width].clamp(-1.0, 1.0)
    return video.permute(1, 0, 2, 3).contiguous()


def load_clip(path: Path, frame_indices: list[int], height: int, width: int):
    """The given source frames of a video (or a still, for [0]) as (3, T, height, width) floats in [-1, 1]."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(path) as image:
            frames = np.array(image.convert("RGB"))[None]  # a copy: torch wants a writable array
    else:
        reader = _open_video(path)
        try:
            frames = reader.get_batch(frame_indices).asnumpy()
        except Exception as error:
            span = f"{frame_indices[0]}..{frame_indices[-1]}"
            raise UnreadableMedia(f"cannot decode frames {span}: {_first_line(error)}") from error
    return resize_and_crop(frames, height, width)
