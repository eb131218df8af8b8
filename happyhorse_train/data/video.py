"""Reading videos (decord) and still images (PIL): probing, and loading one clip as model-ready pixels."""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

VIDEO_SUFFIXES = {".mp4", ".mov", ".webm", ".mkv"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_CHUNK = 32  # frames decoded per call while counting


def find_sidecar(media: Path, tag: str, suffixes) -> Path | None:
    """`<stem><tag><suffix>` beside a media file (clip.mp4 -> clip.mask.png), the first of `suffixes` present."""
    for suffix in sorted(suffixes):
        candidate = media.with_name(f"{media.stem}{tag}{suffix}")
        if candidate.is_file():
            return candidate
    return None


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


def open_video(path: Path, width: int = -1, height: int = -1):
    import decord

    if not path.is_file():
        raise UnreadableMedia("the file is gone (moved or deleted since prepare_clips)")
    if path.stat().st_size == 0:
        raise UnreadableMedia("empty file (0 bytes)")
    decord.logging.set_level(decord.logging.QUIET)  # FFmpeg's own log lines would spill over the progress bars
    try:
        with _stderr_discarded():  # decord logs a failed open itself, besides raising
            return decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height, num_threads=1)
    except Exception as error:  # decord raises its own DECORDError and RuntimeError variants
        raise UnreadableMedia(_open_failure(path, error)) from error


@contextmanager
def _stderr_discarded():
    """File descriptor 2 points at /dev/null meanwhile: native code writes there, past sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _has_container_signature(path: Path) -> bool:
    """Whether the file starts like an MP4/MOV (an ISO box) or WebM/MKV (EBML) container."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    return head[4:8] in _ISO_BOXES or head[:4] == b"\x1a\x45\xdf\xa3"


_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")


def _iso_cut_short(path: Path) -> tuple[bool, bool]:
    """(whether an MP4/MOV's top-level boxes run past the end of the file, whether its index (moov) is whole)."""
    size, offset, index_whole = path.stat().st_size, 0, False
    with open(path, "rb") as handle:
        while offset + 8 <= size:
            handle.seek(offset)
            header = handle.read(16)
            box_size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if box_size == 1 and len(header) == 16:  # a 64-bit size follows the type
                box_size = int.from_bytes(header[8:16], "big")
            elif box_size == 0:  # the box runs to the end of the file
                box_size = size - offset
            if box_size < 8:
                return False, index_whole  # not ISO boxes after all: nothing to say
            if offset + box_size > size:
                return True, index_whole
            index_whole |= kind == b"moov"
            offset += box_size
    return False, index_whole


def _open_failure(path: Path, error: Exception) -> str:
    """A plain drop reason for a video decord cannot open, the same on every run (no timestamps or paths)."""
    if "cannot find video stream" in str(error):
        return "no video stream (audio only, or not a video)"
    if not _has_container_signature(path):
        return "not a video: the bytes are not an MP4, MOV, WebM or MKV container"
    cut_short, index_whole = _iso_cut_short(path)
    if cut_short and not index_whole:
        return "truncated: the file ends before its index (moov atom), so no frame of it can be found"
    if cut_short:
        return (f"truncated: the file ends mid-stream ({path.stat().st_size} bytes), and decord cannot open this "
                "partial file; `ffmpeg -i FILE -c copy FIXED.mp4` may recover the frames before the cut")
    if str(error).startswith("Error reading"):  # decord's whole message for a container FFmpeg cannot parse
        return "unreadable container: FFmpeg cannot parse it (damaged, or an unfinished recording)"
    return f"cannot open as video: {_decoder_message(error)}"


def _decoder_message(error: Exception) -> str:
    """The decoder's message without its log prefixes (time of day, source file and line) or file paths."""
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(error)).strip()
    text = re.sub(r"/\S+", "FILE", text)
    lines = text.splitlines()
    return lines[0][:200] if lines else type(error).__name__


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
            raise UnreadableMedia(f"cannot open as image: {_decoder_message(error)}") from error
        return MediaInfo(1, 0.0, width, height)

    reader = open_video(path)
    try:
        height, width = reader[0].shape[:2]
    except Exception as error:
        raise UnreadableMedia(f"the first frame does not decode: {_decoder_message(error)}") from error
    fps = float(reader.get_avg_fps())
    del reader
    # Count on a small decode size: the codec still decodes every frame, but the colour conversion is cheap.
    frames = count_decodable_frames(open_video(path, width=64, height=64))
    if frames == 0:
        raise UnreadableMedia("no frame decodes")
    if not fps > 0:
        raise UnreadableMedia(f"no usable frame rate (container says {fps})")
    return MediaInfo(frames, fps, width, height)


def resize_and_crop(frames: np.ndarray, height: int, width: int):
    """(T, H, W, 3) uint8 -> (3, T, height, width) float in [-1, 1]: scale to cover, then centre-crop."""
    return resize_frames(frames, height, width).permute(1, 0, 2, 3).contiguous()


def resize_frames(frames: np.ndarray, height: int, width: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, height, width) float in [-1, 1], contiguous: scale to cover, then centre-crop.

    The same arithmetic (x / 127.5 - 1 in float32, then the same interpolate, crop and clamp), done in place in
    channel planes: `scratch` (at least (N, 3, H, W) floats) is reused memory, which spares the page faults of
    fresh memory, the larger part of a plain conversion's time."""
    import torch
    import torch.nn.functional as F

    planar = torch.from_numpy(frames).permute(0, 3, 1, 2)
    src_h, src_w = planar.shape[-2:]
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    if (new_h, new_w) == (src_h, src_w):  # only a crop: convert just the bytes kept (all within [-1, 1] after)
        crop = planar[:, :, top : top + height, left : left + width]
        return torch.empty(crop.shape).copy_(crop).div_(127.5).sub_(1.0)
    video = torch.empty(planar.shape) if scratch is None else scratch[: len(frames)]
    video.copy_(planar).div_(127.5).sub_(1.0)
    # Channel planes are interpolate's faster layout; it computes every output value alike in either layout.
    video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    return video[:, :, top : top + height, left : left + width].clamp(-1.0, 1.0)  # a copy of the crop alone


def load_clip(path: Path, frame_indices: list[int], height: int, width: int):
    """The given source frames of a video (or a still, for [0]) as (3, T, height, width) floats in [-1, 1]."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(path) as image:
                frames = np.array(image.convert("RGB"))[None]  # a copy: torch wants a writable array
        except (OSError, SyntaxError) as error:  # gone, or replaced by something PIL cannot read
            raise UnreadableMedia(f"cannot open as image: {_decoder_message(error)}") from error
    else:
        frames = read_frames(open_video(path), frame_indices, frame_indices)
    return resize_and_crop(frames, height, width)


def read_frames(reader, frame_indices: list[int], clip_indices: list[int]) -> np.ndarray:
    """Frames of an open video as (N, H, W, 3) uint8; if they do not decode, UnreadableMedia naming the
    clip's span (`clip_indices`: the clip's source frames, of which `frame_indices` may be a part)."""
    try:
        return reader.get_batch(frame_indices).asnumpy()
    except Exception as error:  # decord raises its own DECORDError and RuntimeError variants
        span = f"{clip_indices[0]}..{clip_indices[-1]}"
        raise UnreadableMedia(f"cannot decode frames {span}: {_decoder_message(error)}") from error
