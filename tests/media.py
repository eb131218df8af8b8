"""Real media files for tests: H.264 mp4s written with imageio-ffmpeg, PNG stills written with PIL."""

from __future__ import annotations

import zlib
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image


def frame_pattern(index: int, width: int, height: int, level: int = 0) -> np.ndarray:
    """A frame whose content moves with its index: a bright bar over a gradient. Files differ by their
    first index (from the file name), so two test videos are never byte-identical duplicates."""
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame[..., 0] = np.linspace(0, 200, width, dtype=np.uint8)[None, :]
    frame[..., 2] = np.linspace(0, 200, height, dtype=np.uint8)[:, None]
    frame[..., 1] = level
    column = (index * 3) % width
    frame[:, column : column + 4, 1] = 255
    return frame


def write_video(
    path: Path, num_frames: int, fps: float, width: int = 96, height: int = 64, caption: str | None = "a bar",
    index_first: bool = False,
) -> Path:
    """An H.264 mp4; with `index_first` its index (moov atom) precedes the frames, as streaming files have it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(
        path, fps=fps, codec="libx264", macro_block_size=2, quality=8, ffmpeg_log_level="error",
        output_params=["-movflags", "+faststart"] if index_first else None,
    ) as writer:
        name_hash = zlib.crc32(path.name.encode())
        for index in range(num_frames):
            writer.append_data(frame_pattern(name_hash % 97 + index, width, height, level=name_hash // 97 % 160))
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def write_still(path: Path, width: int, height: int, caption: str | None = "a still") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame_pattern(0, width, height)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def ffmpeg(*args: str) -> None:
    """Run the ffmpeg binary that imageio-ffmpeg ships (no system ffmpeg is assumed)."""
    import subprocess

    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", *args], check=True)


def write_audio(path: Path, seconds: float = 1.0) -> Path:
    """An mp4 holding only an AAC audio stream."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg("-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac", str(path))
    return path
