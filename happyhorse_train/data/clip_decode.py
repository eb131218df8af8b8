"""Decoding a manifest's clips for the cache: one reader per source file, each needed source frame decoded once.

Sliding windows with a stride shorter than the window share source frames. `load_clip` decodes every window on
its own (a fresh reader, which seeks back to the key frame before the window and decodes forward from there), so
a file's frames are decoded again for each window that holds them. Here a file's windows are read in start order
through one reader: each window decodes only the frames the earlier ones did not, and each decoded frame is
resized once per bucket size and reused by every window that holds it.

The pixels are bitwise those of `load_clip` (`clip_pixels`): the same decoder at the source size, the same
arithmetic to [-1, 1], the same antialiased resize (it treats each frame on its own, so which frames share a
call changes nothing), the same crop and clamp.
tests/unit/test_clip_decode.py checks this on overlapping windows of a real video.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from happyhorse_train.data.clip_rules import clip_frame_indices
from happyhorse_train.data.video import (
    IMAGE_SUFFIXES,
    UnreadableMedia,
    load_clip,
    open_video,
    read_frames,
    resize_frames,
)

CHUNK_FRAMES = 16  # frames decoded and resized per call, fewer for large frames:
CHUNK_BYTES = 256 << 20  # the most their float copy at the source size takes (reused from chunk to chunk)


class FileFrames:
    """One video's reader and its resized frames, for windows asked for in start order."""

    def __init__(self, path: Path, width: int, height: int):
        self.path = path
        self.reader = None
        self.kept: dict[tuple[int, int, int], torch.Tensor] = {}  # (source frame, height, width) -> (3, h, w)
        self.decoded = 0  # source frames decoded (a frame shared by windows counts once)
        self.chunk = max(1, min(CHUNK_FRAMES, CHUNK_BYTES // (3 * width * height * 4)))
        self.scratch: torch.Tensor | None = None

    def window(self, indices: list[int], height: int, width: int) -> torch.Tensor:
        """The clip of these source frames as (3, T, height, width), like load_clip's."""
        # Windows come in start order, so no later window needs a frame before this one's first.
        self.kept = {k: v for k, v in self.kept.items() if k[0] >= indices[0]}
        new = sorted({i for i in indices if (i, height, width) not in self.kept})
        for start in range(0, len(new), self.chunk):
            chunk = new[start : start + self.chunk]
            if self.reader is None:
                self.reader = open_video(self.path)  # an open that fails is tried again by the next window
            try:
                frames = read_frames(self.reader, chunk, indices)
            except UnreadableMedia:
                self.reader = None  # the next window starts from a fresh reader, as load_clip's would
                raise
            self.decoded += len(chunk)
            shape = (self.chunk, 3, *frames.shape[1:3])
            if self.scratch is None or self.scratch.shape != shape:
                self.scratch = torch.empty(shape)
            for index, frame in zip(chunk, resize_frames(frames, height, width, self.scratch)):
                self.kept[(index, height, width)] = frame
        return torch.stack([self.kept[(i, height, width)] for i in indices], dim=1)


def decode_clips(items: Iterable[tuple[str, dict]]) -> Iterator[tuple[str, dict, torch.Tensor | UnreadableMedia]]:
    """(key, row, pixels) for each (key, manifest row); pixels is the UnreadableMedia when the clip does not decode.

    A file's windows come together, in start order; files in the order of their first clip in `items`, so the
    order is fixed by `items`. Only one file's reader and frames are held at a time.
    """
    by_file: dict[str, list[tuple[str, dict]]] = {}
    for key, row in items:
        by_file.setdefault(row["source"], []).append((key, row))
    for source, clips in by_file.items():
        clips.sort(key=lambda clip: (clip[1]["start_frame"], clip[0]))
        path = Path(source)
        first = clips[0][1]
        frames = None if path.suffix.lower() in IMAGE_SUFFIXES else FileFrames(path, first["width"], first["height"])
        for key, row in clips:
            indices, size = clip_frame_indices(row), (row["bucket_height"], row["bucket_width"])
            try:
                pixels = frames.window(indices, *size) if frames else load_clip(path, indices, *size)
            except UnreadableMedia as error:
                pixels = error
            yield key, row, pixels
