import re

import pytest

from happyhorse_train.data.clip_rules import (
    Bucket,
    ClipRules,
    frames_available,
    largest_4k1,
    nearest_bucket,
    plan_clips,
    source_frame_indices,
)


def test_largest_4k1():
    assert [largest_4k1(n) for n in (0, 1, 4, 5, 8, 9, 121, 124, 125)] == [0, 1, 1, 5, 5, 9, 121, 121, 125]


def test_resampling_picks_the_nearest_earlier_source_frame():
    assert source_frame_indices(0, 5, 24, 24) == [0, 1, 2, 3, 4]
    assert source_frame_indices(0, 5, 60, 24) == [0, 2, 5, 7, 10]
    assert source_frame_indices(10, 4, 30, 24) == [10, 11, 12, 13]
    assert source_frame_indices(0, 3, 29.97002997, 23.976023976) == [0, 1, 2]  # NTSC rates, no float drift
    assert frames_available(48, 0, 24, 24) == 48
    assert frames_available(48, 0, 60, 24) == 20  # target frame 19 lands on source frame floor(47.5) = 47
    assert source_frame_indices(0, 20, 60, 24)[-1] == 47
    assert frames_available(30, 0, 25, 24) == 29  # frame 28 lands on floor(29.17) = 29, the last one
    assert frames_available(48, 0, 48, 24) == 24  # exact ratio 2: frame 24 would need source frame 48


def test_nearest_bucket_by_aspect_ratio():
    buckets = [Bucket(121, 480, 720), Bucket(121, 720, 480)]
    assert nearest_bucket(1920, 1080, buckets) == Bucket(121, 480, 720)
    assert nearest_bucket(1080, 1920, buckets) == Bucket(121, 720, 480)
    assert nearest_bucket(512, 512, buckets + [Bucket(121, 512, 512)]) == Bucket(121, 512, 512)
    assert nearest_bucket(640, 480, buckets, still=True) == Bucket(1, 480, 720)


def test_clip_modes():
    rules = dict(buckets=[Bucket(17, 64, 96)], min_frames=9)
    assert plan_clips(48, 24, 96, 64, ClipRules(**rules)) == (Bucket(17, 64, 96), 17, [0])
    assert plan_clips(48, 24, 96, 64, ClipRules(mode="uniform", num_windows=3, **rules))[2] == [0, 16, 31]
    assert plan_clips(48, 24, 96, 64, ClipRules(mode="sliding", stride=8, **rules))[2] == [0, 8, 16, 24]
    assert plan_clips(48, 24, 96, 64, ClipRules(mode="sliding", **rules))[2] == [0, 17]  # stride = clip length
    # a video just long enough for one window gets one, whatever the mode
    assert plan_clips(17, 24, 96, 64, ClipRules(mode="uniform", **rules))[2] == [0]


def test_short_video_takes_the_largest_4k1_window_or_is_dropped():
    rules = ClipRules(buckets=[Bucket(121, 480, 720)], min_frames=17)
    assert plan_clips(50, 24, 720, 480, rules)[1] == 49
    reason = plan_clips(16, 24, 720, 480, rules)
    assert isinstance(reason, str) and "too short" in reason and "min_frames=17" in reason


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="random"), "mode="),
        (dict(min_frames=10), "4k+1"),
        (dict(buckets=[(120, 480, 720)]), "frames must be 4k+1"),
        (dict(buckets=[(121, 470, 720)]), "multiples of 16"),
        (dict(missing_caption="skip"), "missing_caption"),
    ],
)
def test_bad_rules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ClipRules(**kwargs)
