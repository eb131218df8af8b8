import re

import pytest

from happyhorse_train.data.clip_rules import (
    Bucket,
    ClipRules,
    aspect_sizes,
    frames_available,
    nearest_bucket,
    plan_clips,
    source_frame_indices,
)


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
    buckets = [Bucket(121, 480, 720), Bucket(121, 720, 480), Bucket(49, 480, 720)]
    assert nearest_bucket(1920, 1080, buckets) == Bucket(121, 480, 720)  # the size's longest frame count
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


def test_a_video_takes_the_longest_frame_count_of_its_size_that_it_fills_or_is_dropped():
    rules = ClipRules(buckets=[Bucket(f, 480, 720) for f in (17, 49, 121)], min_frames=17)
    assert plan_clips(50, 24, 720, 480, rules)[:2] == (Bucket(49, 480, 720), 49)
    assert plan_clips(48, 24, 720, 480, rules)[1] == 17  # one frame short of 49: the next bucket down
    assert plan_clips(500, 24, 720, 480, rules)[1] == 121
    reason = plan_clips(16, 24, 720, 480, rules)
    assert reason == ("too short: 16 frames at 24 fps give 16 frames at 24 fps, fewer than 17 (the shortest bucket "
                      "of size 480x720)")


def test_default_buckets_group_a_folder_of_many_lengths_and_shapes_into_a_few():
    sizes = aspect_sizes()
    assert (480, 720) in sizes and (720, 480) in sizes  # 3:2 and 2:3 of 720x480 are 720x480 itself
    assert all(h % 16 == 0 and w % 16 == 0 and abs(h * w / (720 * 480) - 1) < 0.05 for h, w in sizes)
    rules = ClipRules()
    # (frames, fps, width, height) of a typical folder: phone, camera, screen capture, square, lengths 2-12 s
    videos = [(117, 24, 1280, 720), (69, 24, 720, 480), (45, 30, 720, 480), (300, 60, 1920, 1080),
              (250, 25, 1920, 1080), (130, 30, 1080, 1920), (90, 24, 1080, 1080), (96, 24, 854, 480),
              (288, 24, 1280, 720), (61, 30, 640, 480)]
    buckets = [str(plan_clips(*video, rules)[0]) for video in videos]
    # Measured: 8 buckets for these 10 (5 aspect ratios); with the old defaults (121 frames or the video's own
    # largest 4k+1, two sizes) each video was a bucket of its own.
    assert len(set(buckets)) == 8, buckets
    assert buckets.count("121x448x784") == 2 and buckets.count("97x448x784") == 2
    assert plan_clips(117, 24, 1280, 720, rules)[0] == Bucket(97, 448, 784)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="random"), "mode="),
        (dict(min_frames=10), "4k+1"),
        (dict(buckets=[(120, 480, 720)]), "bucket 120x480x720: frames 120 is not 4k+1"),
        (dict(buckets=[(17, 95, 144)]), "bucket 17x95x144: height 95 is not a multiple of 16"),
        (dict(missing_caption="skip"), "missing_caption"),
    ],
)
def test_bad_rules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ClipRules(**kwargs)
