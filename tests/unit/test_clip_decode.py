"""The cache's file-by-file decoding (data/clip_decode.py) against clip_pixels, on real H.264 files made by ffmpeg;
and the background thread that decodes ahead of the encoder (cache_fill.prefetch)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from happyhorse_train.data.cache_fill import clip_pixels, prefetch
from happyhorse_train.data.clip_decode import FileFrames, decode_clips
from happyhorse_train.data.clip_rules import Bucket, ClipRules, clip_frame_indices
from happyhorse_train.data.prepare import prepare_clips
from happyhorse_train.data.video import UnreadableMedia, resize_frames
from tests.media import write_still

# 17-frame windows every 6 target frames: each source frame is in two or three windows. 112x64 sources are
# resized (antialiased, 0.5x) to 56x32 and centre-cropped to the 32x48 bucket.
RULES = ClipRules(mode="sliding", stride=6, min_frames=17, buckets=[Bucket(17, 32, 48), Bucket(17, 48, 32)])


def ffmpeg_video(path: Path, fps: int, frames: int, width: int = 112, height: int = 64) -> Path:
    """testsrc2 in H.264 with a key frame every 10 frames and B-frames: windows start mid-GOP, so clip_pixels seeks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
               "-i", f"testsrc2=size={width}x{height}:rate={fps}", "-frames:v", str(frames), "-c:v", "libx264",
               "-pix_fmt", "yuv420p", "-g", "10", "-bf", "2", str(path)]
    subprocess.run(command, check=True, capture_output=True)
    path.with_suffix(".txt").write_text(f"test pattern at {fps} fps", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    source = tmp_path_factory.mktemp("clip_decode")
    ffmpeg_video(source / "a_24fps.mp4", 24, 60)
    ffmpeg_video(source / "b_30fps.mp4", 30, 70)  # 30 -> 24 fps: the windows skip source frames
    ffmpeg_video(source / "d_crop_only.mp4", 24, 40, width=64, height=32)  # already 32 high: cropped, not resized
    write_still(source / "c_still.png", 60, 40)
    result = prepare_clips(source, RULES, num_workers=1, progress=False)
    assert not result.dropped
    return result.rows


def plain_resize_and_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """The reference: uint8 to [-1, 1], antialiased resize to cover, centre crop, clamp; (N, 3, height, width)."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    src_h, src_w = video.shape[-2:]
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    if (new_h, new_w) != (src_h, src_w):
        video = torch.nn.functional.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return video[:, :, top : top + height, left : left + width].clamp(-1.0, 1.0)


def keyed(rows) -> list[tuple[str, dict]]:
    return [(row["clip_id"], row) for row in reversed(rows)]  # not in start order: decode_clips sorts


def test_overlapping_windows_decode_to_clip_pixels_bitwise(rows):
    decoded = list(decode_clips(keyed(rows)))
    assert sorted(key for key, _, _ in decoded) == sorted(row["clip_id"] for row in rows)
    for _, row, pixels in decoded:
        expected = clip_pixels(row)
        assert pixels.dtype == expected.dtype and pixels.shape == expected.shape and pixels.is_contiguous()
        assert torch.equal(pixels, expected), (row["source"], row["start_frame"])
    videos = [row for row in rows if row["source"].endswith(".mp4")]
    assert len(videos) >= 10 and {row["bucket"] for row in videos} == {"17x32x48"}


@pytest.mark.parametrize(
    "source, bucket",
    [((720, 1280), (480, 720)), ((480, 736), (480, 720)), ((100, 70), (480, 720)), ((481, 719), (720, 480))],
)
def test_resize_frames_in_reused_memory_gives_the_plain_arithmetic_bitwise(source, bucket):
    frames = np.random.default_rng(0).integers(0, 256, (2, *source, 3), dtype=np.uint8)
    expected = plain_resize_and_crop(frames, *bucket)
    scratch = torch.full((3, 3, *source), float("nan"))  # reused memory: what it held before must not matter
    for got in (resize_frames(frames, *bucket), resize_frames(frames, *bucket, scratch)):
        assert got.is_contiguous() and torch.equal(got, expected)


@pytest.mark.parametrize("name", ["a_24fps.mp4", "b_30fps.mp4"])
def test_each_source_frame_is_decoded_once(rows, name):
    windows = sorted((row for row in rows if row["source"].endswith(name)), key=lambda row: row["start_frame"])
    indices = [clip_frame_indices(row) for row in windows]
    assert len(windows) >= 4 and set(indices[0]) & set(indices[1])  # the windows overlap
    frames = FileFrames(Path(windows[0]["source"]), windows[0]["width"], windows[0]["height"])
    for row, wanted in zip(windows, indices):
        frames.window(wanted, row["bucket_height"], row["bucket_width"])
    assert frames.decoded == len(set().union(*indices)) < sum(map(len, indices))


def test_windows_come_file_by_file_in_start_order(rows):
    order = [(row["source"], row["start_frame"]) for _, row, _ in decode_clips(keyed(rows))]
    files = list(dict.fromkeys(source for source, _ in order))
    assert len(files) == 4 and order == sorted(order, key=lambda clip: (files.index(clip[0]), clip[1]))


def test_a_file_that_no_longer_decodes_fails_each_of_its_clips_as_clip_pixels_does(rows, tmp_path):
    broken = tmp_path / "b_30fps.mp4"
    broken.write_bytes(b"overwritten after prepare")
    changed = [{**row, "source": str(broken)} if row["source"].endswith("b_30fps.mp4") else row for row in rows]
    for _, row, pixels in decode_clips(keyed(changed)):
        if row["source"] != str(broken):
            assert isinstance(pixels, torch.Tensor)
            continue
        with pytest.raises(UnreadableMedia) as expected:
            clip_pixels(row)
        assert isinstance(pixels, UnreadableMedia) and str(pixels) == str(expected.value)


def test_prefetch_keeps_order_stays_bounded_and_raises_in_place():
    produced = []

    def items():
        for i in range(6):
            produced.append(i)
            yield i
        raise UnreadableMedia("boom")  # not caught by decode_clips: must reach the consumer

    got = []
    with pytest.raises(UnreadableMedia, match="boom"):
        for item in prefetch(items(), depth=1):
            threading.Event().wait(0.05)  # a slow consumer: the producer must wait for it
            assert len(produced) <= item + 3  # the one in hand, one queued, one waiting to be queued
            got.append(item)
    assert got == list(range(6))


def test_closing_prefetch_early_stops_its_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    stream = prefetch(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert threading.active_count() == before
