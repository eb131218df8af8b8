"""Which clips a video yields: fps resampling, 4k+1 windows, clip modes and buckets. Pure functions.

A clip of N frames at the target fps takes source frame `start + floor(i * source_fps / target_fps)`
for i in 0..N-1 (nearest earlier frame: 60 -> 24 fps takes 0, 2, 5, 7, 10, ...; 24 -> 24 takes every frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# A frame index computed as i * ratio is compared against whole frames; this absorbs float noise
# (e.g. 29.97 fps) without ever moving an index by a frame.
_EPS = 1e-6


@dataclass(frozen=True)
class Bucket:
    """A training shape: at most `frames` frames (4k+1), resized and centre-cropped to height x width."""

    frames: int
    height: int
    width: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


@dataclass
class ClipRules:
    target_fps: float = 24.0
    min_frames: int = 17  # clips shorter than this (after resampling) are dropped; stills are exempt
    mode: str = "head"  # head | uniform | sliding
    num_windows: int = 3  # uniform: how many evenly spaced windows
    stride: int = 0  # sliding: step between window starts in target frames; 0 = the window length
    buckets: list[Bucket] = field(default_factory=lambda: [Bucket(121, 480, 720), Bucket(121, 720, 480)])
    missing_caption: str = "drop"  # drop | empty

    def __post_init__(self) -> None:
        self.buckets = [b if isinstance(b, Bucket) else Bucket(*b) for b in self.buckets]
        if self.mode not in ("head", "uniform", "sliding"):
            raise ValueError(f"mode={self.mode!r}; use head, uniform or sliding")
        if self.missing_caption not in ("drop", "empty"):
            raise ValueError(f"missing_caption={self.missing_caption!r}; use drop or empty")
        if self.target_fps <= 0 or self.num_windows < 1 or self.stride < 0:
            raise ValueError("target_fps and num_windows must be positive, stride >= 0")
        if self.min_frames < 1 or (self.min_frames - 1) % 4:
            raise ValueError(f"min_frames={self.min_frames} must be of the form 4k+1")
        for b in self.buckets:
            if (b.frames - 1) % 4 or b.frames < 1 or b.height % 16 or b.width % 16:
                raise ValueError(f"bucket {b}: frames must be 4k+1 and height, width multiples of 16")


def largest_4k1(n: int) -> int:
    """The largest frame count of the form 4k+1 that is <= n (0 when n < 1)."""
    return (n - 1) // 4 * 4 + 1 if n >= 1 else 0


def source_frame_indices(start: int, num_frames: int, source_fps: float, target_fps: float) -> list[int]:
    ratio = source_fps / target_fps
    return [start + math.floor(i * ratio + _EPS) for i in range(num_frames)]


def frames_available(source_frames: int, start: int, source_fps: float, target_fps: float) -> int:
    """How many target-fps frames fit in the source from `start` on."""
    if start >= source_frames:
        return 0
    # Target frame i lands on source frame start + floor(i * ratio), which exists while i * ratio < frames left.
    ratio = source_fps / target_fps
    return math.ceil((source_frames - start) / ratio - _EPS)


def nearest_bucket(width: int, height: int, buckets: list[Bucket], still: bool = False) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log space) to width / height; stills get 1 frame."""
    aspect = math.log(width / height)
    best = min(buckets, key=lambda b: abs(math.log(b.aspect) - aspect))
    return Bucket(1, best.height, best.width) if still else best


def window_starts(source_frames: int, source_fps: float, clip_frames: int, rules: ClipRules) -> list[int]:
    """Start frames (in the source) of the windows a video yields, each `clip_frames` target frames long."""
    span = source_frame_indices(0, clip_frames, source_fps, rules.target_fps)[-1] + 1
    last_start = source_frames - span
    if rules.mode == "head" or last_start <= 0:
        return [0]
    if rules.mode == "uniform":
        count = rules.num_windows
        starts = [round(i * last_start / (count - 1)) for i in range(count)] if count > 1 else [0]
        return sorted(set(starts))
    stride = rules.stride or clip_frames
    step = max(1, math.floor(stride * source_fps / rules.target_fps + _EPS))
    return list(range(0, last_start + 1, step))


def plan_clips(
    source_frames: int, source_fps: float, width: int, height: int, rules: ClipRules
) -> tuple[Bucket, int, list[int]] | str:
    """(bucket, clip frames, window starts) for a video, or the reason it yields no clip."""
    bucket = nearest_bucket(width, height, rules.buckets)
    available = frames_available(source_frames, 0, source_fps, rules.target_fps)
    clip_frames = min(bucket.frames, largest_4k1(available))
    if clip_frames < rules.min_frames:
        return (
            f"too short: {source_frames} frames at {source_fps:g} fps give {available} frames at "
            f"{rules.target_fps:g} fps, fewer than min_frames={rules.min_frames}"
        )
    return bucket, clip_frames, window_starts(source_frames, source_fps, clip_frames, rules)
