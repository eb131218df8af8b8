"""Which clips a video yields: fps resampling, 4k+1 windows, clip modes and buckets. Pure functions.

A clip of N frames at the target fps takes source frame `start + floor(i * source_fps / target_fps)`
for i in 0..N-1 (nearest earlier frame: 60 -> 24 fps takes 0, 2, 5, 7, 10, ...; 24 -> 24 takes every frame).

Buckets group: a video takes the size of the bucket nearest its aspect ratio, and the longest frame count
of that size that it fills, so clips of any length and shape land in a few shapes (the default: seven frame
counts by seven aspect ratios of the model's pixel area).
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

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


DEFAULT_FRAME_COUNTS = (17, 33, 49, 65, 81, 97, 121)  # 0.7 to 5 s at 24 fps
DEFAULT_ASPECTS = ((16, 9), (3, 2), (4, 3), (1, 1), (3, 4), (2, 3), (9, 16))  # width : height
DEFAULT_AREA = 720 * 480  # HappyHorse-1.0's pixels per frame


def aspect_sizes(area: int = DEFAULT_AREA, aspects=DEFAULT_ASPECTS) -> list[tuple[int, int]]:
    """(height, width) per aspect ratio, each a multiple of 16, with about `area` pixels (3:2 of 720x480: itself)."""
    sizes = []
    for aspect_w, aspect_h in aspects:
        height = math.sqrt(area * aspect_h / aspect_w)
        sizes.append((round(height / 16) * 16, round(height * aspect_w / aspect_h / 16) * 16))
    return sizes


def default_buckets() -> list[Bucket]:
    return [Bucket(frames, h, w) for h, w in aspect_sizes() for frames in DEFAULT_FRAME_COUNTS]


@dataclass
class ClipRules:
    target_fps: float = 24.0
    min_frames: int = 17  # clips shorter than this (after resampling) are dropped; stills are exempt
    mode: str = "head"  # head | uniform | sliding
    num_windows: int = 3  # uniform: how many evenly spaced windows
    stride: int = 0  # sliding: step between window starts in target frames; 0 = the window length
    buckets: list[Bucket] = field(default_factory=default_buckets)
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
            wrong = [f"frames {b.frames} is not 4k+1"] if b.frames < 1 or (b.frames - 1) % 4 else []
            wrong += [f"{name} {value} is not a multiple of 16" for name, value in
                      (("height", b.height), ("width", b.width)) if value % 16 or value < 16]
            if wrong:
                raise ValueError(f"bucket {b}: {', '.join(wrong)}")


def source_frame_indices(start: int, num_frames: int, source_fps: float, target_fps: float) -> list[int]:
    ratio = source_fps / target_fps
    return [start + math.floor(i * ratio + _EPS) for i in range(num_frames)]


def clip_frame_indices(row: dict) -> list[int]:
    """The source frames of a manifest row's clip."""
    return source_frame_indices(
        row["start_frame"], row["num_frames"], row["source_fps"] or 1.0, row["target_fps"] or 1.0
    )


def frames_available(source_frames: int, start: int, source_fps: float, target_fps: float) -> int:
    """How many target-fps frames fit in the source from `start` on."""
    if start >= source_frames:
        return 0
    # Target frame i lands on source frame start + floor(i * ratio), which exists while i * ratio < frames left.
    ratio = source_fps / target_fps
    return math.ceil((source_frames - start) / ratio - _EPS)


def nearest_size(width: int, height: int, buckets: list[Bucket]) -> tuple[int, int]:
    """The (height, width) of the buckets whose aspect ratio is nearest (in log space) to width / height."""
    aspect = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b.aspect) - aspect), b.height, b.width))
    return best.height, best.width


def nearest_bucket(width: int, height: int, buckets: list[Bucket], still: bool = False) -> Bucket:
    """The nearest-aspect bucket with the most frames; stills get 1 frame of that size."""
    size = nearest_size(width, height, buckets)
    frames = 1 if still else max(b.frames for b in buckets if (b.height, b.width) == size)
    return Bucket(frames, *size)


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
    """(bucket, clip frames, window starts) for a video, or the reason it yields no clip: the bucket is the
    nearest-aspect size with the longest frame count the video fills (at least min_frames)."""
    size = nearest_size(width, height, rules.buckets)
    available = frames_available(source_frames, 0, source_fps, rules.target_fps)
    counts = sorted(b.frames for b in rules.buckets if (b.height, b.width) == size and b.frames >= rules.min_frames)
    fitting = [frames for frames in counts if frames <= available]
    if not fitting:
        shortest = counts[0] if counts else rules.min_frames
        return (
            f"too short: {source_frames} frames at {source_fps:g} fps give {available} frames at "
            f"{rules.target_fps:g} fps, fewer than {shortest} (the shortest bucket of size {size[0]}x{size[1]}"
            f"{'' if counts else f', min_frames={rules.min_frames}'})"
        )
    bucket = Bucket(fitting[-1], *size)
    return bucket, bucket.frames, window_starts(source_frames, source_fps, bucket.frames, rules)
