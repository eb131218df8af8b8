"""prepare_clips on real video files: exactly the clips the rules give, and every bad file reported, not fatal."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from happyhorse_train.data.clip_rules import Bucket, ClipRules
from happyhorse_train.data.prepare import load_manifest, prepare_clips, write_dataset_folder
from happyhorse_train.errors import UserInputError
from tests.conftest import run_script
from tests.media import write_audio, write_still, write_video

BUCKETS = [Bucket(frames, *size) for size in ((64, 96), (96, 64)) for frames in (9, 17)]
RULES = dict(buckets=BUCKETS, min_frames=9)


def prepare(folder, **overrides):
    return prepare_clips(folder, ClipRules(**{**RULES, **overrides}), num_workers=2, progress=False)


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_video(root / "a_24fps.mp4", 30, 24)
    write_video(root / "b_25fps.mp4", 30, 25)
    write_video(root / "c_30fps.mp4", 20, 30)
    write_video(root / "d_60fps.mp4", 48, 60)
    write_video(root / "e_portrait.mp4", 20, 24, width=64, height=96)
    write_video(root / "sub" / "f_two_seconds.mp4", 48, 24)
    write_video(root / "g_wide.mp4", 12, 24, width=100, height=50)
    write_still(root / "h_still.png", 120, 80)
    return root


def by_name(rows):
    return {row["source"].rsplit("/", 1)[1]: row for row in rows}


def test_manifest_holds_exactly_the_clips_and_frame_counts_the_rules_give(media_folder):
    result = prepare(media_folder)
    assert result.dropped == []
    rows = by_name(result.rows)
    #               frames, source span, bucket          (worked by hand from the rules in clip_rules.py)
    expected = {
        "a_24fps.mp4": (17, 17, "17x64x96"),  # 30 frames at 24 fps: 17 fit the bucket
        "b_25fps.mp4": (17, 17, "17x64x96"),  # 25 -> 24 fps: frame 16 lands on floor(16.67) = 16
        "c_30fps.mp4": (9, 11, "9x64x96"),  # 20 frames at 30 fps = 16 at 24 fps: fills 9, not 17
        "d_60fps.mp4": (17, 41, "17x64x96"),  # 60 -> 24 fps: frame 16 lands on source frame 40
        "e_portrait.mp4": (17, 17, "17x96x64"),
        "f_two_seconds.mp4": (17, 17, "17x64x96"),
        "g_wide.mp4": (9, 9, "9x64x96"),  # 12 frames -> 9, c's bucket; aspect 2.0 is nearest 1.5
        "h_still.png": (1, 1, "1x64x96"),
    }
    assert {name: (r["num_frames"], r["source_span"], r["bucket"]) for name, r in rows.items()} == expected
    names = ("a_24fps.mp4", "b_25fps.mp4", "c_30fps.mp4", "d_60fps.mp4")
    assert [rows[n]["source_fps"] for n in names] == [24, 25, 30, 60]
    assert rows["d_60fps.mp4"]["source_frames"] == 48 and rows["e_portrait.mp4"]["width"] == 64
    assert all(r["start_frame"] == 0 and r["caption"] for r in rows.values())
    assert len({r["clip_id"] for r in result.rows}) == len(result.rows)


def test_uniform_and_sliding_windows(media_folder):
    uniform = [r for r in prepare(media_folder, mode="uniform", num_windows=3).rows if "two_seconds" in r["source"]]
    assert [r["start_frame"] for r in uniform] == [0, 16, 31]
    sliding = prepare(media_folder, mode="sliding", stride=8).rows
    starts = lambda name: [r["start_frame"] for r in sliding if name in r["source"]]  # noqa: E731
    assert starts("two_seconds") == [0, 8, 16, 24]  # last start 48 - 17 = 31
    assert starts("d_60fps") == [0]  # a stride of 8 frames is 20 at 60 fps, but the last start is 48 - 41 = 7


def test_dataset_folder_round_trips_through_datasets(media_folder, tmp_path):
    rules = ClipRules(**RULES)
    result = prepare_clips(media_folder, rules, num_workers=1, progress=False)
    write_dataset_folder(result, media_folder, tmp_path, rules)
    manifest = load_manifest(tmp_path)
    assert len(manifest) == 8
    assert set(manifest.column_names) >= {"source", "fingerprint", "start_frame", "bucket", "caption"}
    assert json.loads((tmp_path / "report.json").read_text())["clips"] == 8


def bad_case(kind, root):
    """Write one bad file of the given kind; return (its name, the reason it must be dropped for), or a kept check."""
    if kind == "zero_byte":
        (root / "bad.mp4").write_bytes(b"")
        return "bad.mp4", "empty file"
    if kind == "truncated":
        good = write_video(root / "bad.mp4", 30, 24).read_bytes()
        (root / "bad.mp4").write_bytes(good[: len(good) // 2])
        return "bad.mp4", "truncated: the file ends before its index (moov atom)"
    if kind == "text_as_mp4":
        (root / "bad.mp4").write_text("this is not a video\n")
        (root / "bad.txt").write_text("caption")
        return "bad.mp4", "not a video: the bytes are not an MP4, MOV, WebM or MKV container"
    if kind == "audio_only":
        write_audio(root / "bad.mp4")
        return "bad.mp4", "no video stream (audio only, or not a video)"
    if kind == "too_short":
        write_video(root / "bad.mp4", 6, 24)
        return "bad.mp4", "too short: 6 frames at 24 fps give 6 frames at 24 fps, fewer than 9 (the shortest bucket"
    if kind == "mask_of_another_size":
        write_video(root / "bad.mp4", 20, 24)
        write_still(root / "bad.mask.png", 50, 50, caption=None)
        return "bad.mp4", "its loss mask bad.mask.png is 50x50, the clip 96x64"
    if kind == "empty_caption":
        write_video(root / "bad.mp4", 20, 24, caption=" \n")
        return "bad.mp4", "no caption (an empty sidecar .txt counts as none"
    if kind == "unreadable_caption":
        write_video(root / "bad.mp4", 20, 24, caption=None)
        (root / "bad.txt").write_bytes(b"caf\xe9 \xff\xfe")  # Latin-1 bytes, not UTF-8
        return "bad.mp4", "caption file bad.txt is not UTF-8"
    if kind == "missing_caption":
        write_video(root / "bad.mp4", 20, 24, caption=None)
        return "bad.mp4", "no caption"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["zero_byte", "truncated", "text_as_mp4", "audio_only", "too_short", "unreadable_caption",
             "missing_caption", "empty_caption", "mask_of_another_size"]
)
def test_a_bad_file_is_reported_and_every_other_clip_kept(kind, tmp_path):
    write_video(tmp_path / "good_one.mp4", 20, 24)
    write_video(tmp_path / "good_two.mp4", 20, 30)
    name, reason = bad_case(kind, tmp_path)
    result = prepare(tmp_path)
    assert sorted(by_name(result.rows)) == ["good_one.mp4", "good_two.mp4"]
    [dropped] = result.dropped
    assert dropped.source.endswith(name) and reason in dropped.reason, dropped


def test_a_byte_identical_copy_is_reported_as_a_duplicate(tmp_path):
    original = write_video(tmp_path / "original.mp4", 20, 24)
    (tmp_path / "copy.mp4").write_bytes(original.read_bytes())
    (tmp_path / "copy.txt").write_text("another caption")
    result = prepare(tmp_path)
    assert [r["source"] for r in result.rows] == [str(tmp_path / "copy.mp4")]  # the first in sorted order stays
    [dropped] = result.dropped
    assert dropped.source == "original.mp4" and dropped.reason == "same content as copy.mp4"  # relative paths


def test_non_ascii_caption_is_kept_exactly(tmp_path):
    caption = "一匹の馬が浜辺を走る, café au lait ✓"
    write_video(tmp_path / "clip.mp4", 20, 24, caption=caption)
    [row] = prepare(tmp_path).rows
    assert row["caption"] == caption


def test_missing_caption_policy_empty_keeps_the_clip(tmp_path):
    write_video(tmp_path / "clip.mp4", 20, 24, caption=None)
    [row] = prepare(tmp_path, missing_caption="empty").rows
    assert row["caption"] == ""


def test_captions_from_jsonl_and_csv(tmp_path):
    write_video(tmp_path / "one.mp4", 20, 24, caption=None)
    write_video(tmp_path / "sub" / "two.mp4", 20, 24, caption=None)
    write_video(tmp_path / "three.mp4", 20, 24, caption=None)
    (tmp_path / "captions.jsonl").write_text(
        '{"file": "one.mp4", "caption": "first"}\n{"file": "sub/two.mp4", "caption": "second"}\n'
    )
    (tmp_path / "captions.csv").write_text('file,caption\nthree.mp4,"third, with a comma"\n')
    rows = by_name(prepare(tmp_path).rows)
    assert {name: row["caption"] for name, row in rows.items()} == {
        "one.mp4": "first",
        "two.mp4": "second",
        "three.mp4": "third, with a comma",
    }


def test_cli_exit_status_zero_with_drops_and_a_clear_error_when_nothing_is_usable(tmp_path):
    source, output = tmp_path / "source", tmp_path / "dataset"
    write_video(source / "good.mp4", 20, 24)
    (source / "empty.mp4").parent.mkdir(exist_ok=True)
    (source / "empty.mp4").write_bytes(b"")
    args = ["data_tools/prepare_clips.py", str(source), str(output), "--bucket", "17x64x96", "--min-frames", "9"]
    ok = run_script(*args)
    assert ok.returncode == 0, ok.stderr
    assert "1 clips from 1 files; 1 dropped" in ok.stdout
    assert "empty.mp4: empty file (0 bytes)" in (output / "report.txt").read_text()

    (source / "good.mp4").unlink()
    nothing = run_script(*args[:2], str(tmp_path / "dataset2"), *args[3:])
    assert nothing.returncode == 2
    assert "no usable clips" in nothing.stderr and "Traceback" not in nothing.stderr
    assert (tmp_path / "dataset2" / "report.txt").is_file()  # the report explains why


def test_missing_source_folder_is_one_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="source folder not found"):
        prepare(tmp_path / "nope")


def test_files_cut_short_keep_what_decodes_or_say_why_not(tmp_path):
    # decord reads a whole file when it opens it: an mp4 cut mid-stream (its index first, as streaming files
    # have it) opens only sometimes (a large 720x480 one cut at 70% did, with 81 of 120 frames); these small
    # ones cut at 30/60/90% do not. One with its index last (ffmpeg's default) has no index left once cut.
    whole = write_video(tmp_path / "whole.mp4", 60, 24, index_first=True).read_bytes()
    for percent in (30, 60, 90):
        (tmp_path / f"cut_{percent}.mp4").write_bytes(whole[: len(whole) * percent // 100])
        (tmp_path / f"cut_{percent}.txt").write_text("cut")
    index_last = write_video(tmp_path / "index_last.mp4", 60, 24).read_bytes()
    (tmp_path / "index_last.mp4").write_bytes(index_last[: len(index_last) * 90 // 100])
    rules = dict(buckets=[Bucket(f, 64, 96) for f in (9, 17, 33, 49)])
    result = prepare(tmp_path, **rules)
    frames = {name: row["source_frames"] for name, row in by_name(result.rows).items()}
    reasons = {d.source: d.reason for d in result.dropped}
    assert frames["whole.mp4"] == 60
    for name in ("cut_30.mp4", "cut_60.mp4", "cut_90.mp4"):
        assert 0 < frames.get(name, 0) < 60 or reasons[name].startswith("truncated: the file ends mid-stream")
    assert reasons["index_last.mp4"] == ("truncated: the file ends before its index (moov atom), so no frame of it "
                                         "can be found")


def test_a_real_folder_through_the_cli_plain_deterministic_and_incremental(tmp_path):
    source, output = tmp_path / "source", tmp_path / "dataset"
    write_video(source / "a.mp4", 20, 24)
    write_video(source / "b.mp4", 40, 24)
    write_still(source / "still.png", 96, 64)  # a bucket of its own: no batch of 2 holds it
    write_video(source / "bom.mp4", 20, 24, caption=None)
    (source / "bom.txt").write_bytes("\ufeffBOM caption".encode())
    write_audio(source / "sub" / "audio.mp4")
    (source / "sub" / "audio.txt").write_text("sound")
    args = ["data_tools/prepare_clips.py", str(source), str(output), "--bucket", "9x64x96", "--bucket", "17x64x96",
            "--min-frames", "9", "--batch-size", "2"]
    first = run_script(*args)
    assert first.returncode == 0, first.stderr
    assert "video_reader.cc" not in first.stderr and "[mov," not in first.stderr  # the decoder's own log lines
    assert "note: at batch size 2 on 1 process(es): 1 clip(s) in 1 bucket(s) smaller than a batch are never " \
           "trained (1x64x96: 1;" in first.stdout
    report = (output / "report.txt").read_text()
    assert "  sub/audio.mp4: no video stream (audio only, or not a video)" in report  # relative to the source
    assert "never trained" in report
    assert by_name(load_manifest(output).to_list())["bom.mp4"]["caption"] == "BOM caption"
    report_json = (output / "report.json").read_bytes()

    again = run_script(*args)
    assert again.returncode == 0 and "decoded 0 new or changed file(s)" in again.stdout, again.stdout
    assert (output / "report.json").read_bytes() == report_json  # the same report, byte for byte
    write_video(source / "a.mp4", 24, 24)  # changed
    changed = run_script(*args)
    assert "decoded 1 new or changed file(s)" in changed.stdout, changed.stdout

    (output / "inspect.png").write_bytes(b"a plot of the old manifest")
    other_rules = run_script(*args[:-4], "--min-frames", "17")
    assert other_rules.returncode == 2 and "Traceback" not in other_rules.stderr
    assert f"error: {output} holds a dataset made with other rules (min_frames: 9 -> 17): pass --replace" \
           in other_rules.stderr, other_rules.stderr
    replaced = run_script(*args[:-4], "--min-frames", "17", "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert "decoded 0 new or changed file(s)" in replaced.stdout  # the probes hold whatever the rules
    assert json.loads((output / "rules.json").read_text())["min_frames"] == 17
    assert not (output / "inspect.png").exists()


@pytest.mark.parametrize("case, message", [
    ("output_is_a_file", "is a file: give a folder for the dataset"),
    ("source_is_a_file", "is a file: give the folder that holds your videos and images"),
    ("bad_bucket", "bucket 17x95x144: height 95 is not a multiple of 16"),
    ("empty_source", "no videos or images in"),
])
def test_each_bad_input_is_one_line_before_any_decoding(case, message, tmp_path):
    source, output = tmp_path / "source", tmp_path / "dataset"
    write_video(source / "a.mp4", 20, 24)
    args = [str(source), str(output)]
    if case == "output_is_a_file":
        output.write_text("not a folder")
    elif case == "source_is_a_file":
        args[0] = str(source / "a.mp4")
    elif case == "bad_bucket":
        args += ["--bucket", "17x95x144"]
    else:
        args[0] = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
    result = run_script("data_tools/prepare_clips.py", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "probing" not in result.stderr


def test_default_buckets_group_real_files_of_many_lengths_rates_and_shapes(tmp_path):
    shapes = [(20, 24, 96, 64), (24, 30, 96, 64), (40, 24, 96, 64), (41, 25, 96, 64), (60, 24, 64, 96),
              (50, 30, 128, 72), (70, 24, 128, 72)]  # (frames, fps, width, height)
    for i, (frames, fps, width, height) in enumerate(shapes):
        write_video(tmp_path / f"v{i}.mp4", frames, fps, width=width, height=height)
    rows = prepare_clips(tmp_path, ClipRules(), num_workers=2, progress=False).rows
    # 20 frames (and 24 at 30 fps = 20 at 24) fill 17; 40 (41 at 25 fps = 40) fill 33; 16:9 takes 448x784
    assert Counter(row["bucket"] for row in rows) == {
        "17x480x720": 2, "33x480x720": 2, "49x720x480": 1, "33x448x784": 1, "65x448x784": 1
    }
