"""inspect_dataset on a real clip dataset folder: exact counts in every table, drops grouped by reason, a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from happyhorse_train.data.clip_rules import Bucket, ClipRules
from happyhorse_train.data.inspect import (
    bucket_histogram,
    clips_per_source,
    format_table,
    frame_histogram,
    group_dropped,
    load_dataset_folder,
    missing_captions,
    reason_kind,
    render_report,
    summarize,
)
from happyhorse_train.data.prepare import prepare_clips, write_dataset_folder
from happyhorse_train.errors import UserInputError
from tests.conftest import run_script
from tests.media import write_still, write_video

# sliding windows with the default stride (the clip length), so sources give different numbers of clips
RULES = ClipRules(
    buckets=[Bucket(frames, *size) for size in ((64, 96), (96, 64)) for frames in (9, 17)], min_frames=9,
    mode="sliding", missing_caption="empty",
)


def make_dataset(source, output):
    result = prepare_clips(source, RULES, num_workers=1, progress=False)
    write_dataset_folder(result, source, output, RULES)
    return result


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    source, output = root / "source", root / "dataset"
    write_video(source / "long.mp4", 60, 24)  # starts 0, 17, 34: 3 clips of 17x64x96
    write_video(source / "medium.mp4", 40, 24)  # starts 0, 17: 2 clips of 17x64x96
    write_video(source / "fast.mp4", 20, 30)  # 16 frames at 24 fps -> 9x64x96
    write_video(source / "portrait.mp4", 20, 24, width=64, height=96)  # 17x96x64
    write_video(source / "nocap.mp4", 12, 24, caption=None)  # 9x64x96, kept with an empty caption
    write_still(source / "still.png", 120, 80)  # 1x64x96
    (source / "empty.mp4").write_bytes(b"")
    (source / "empty.txt").write_text("a caption for nothing")
    write_video(source / "tiny.mp4", 6, 24)  # too short for min_frames=9
    (source / "notes.md").write_text("not media")
    result = make_dataset(source, output)
    assert len(result.rows) == 9 and len(result.dropped) == 3, (result.rows, result.dropped)
    run = run_script("data_tools/inspect_dataset.py", str(output))
    return output, run


def section(text, title):
    """The lines of the section whose title starts with `title`, up to the next blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    body = lines[start + 2 :]  # skip the title and its underline
    return body[: body.index("")] if "" in body else body


def table(lines):
    """{first cell: the other cells} of a section's table (after the header and its dashes)."""
    return {parts[0]: parts[1:] for parts in (line.split() for line in lines[2:])}


def test_cli_prints_exact_tables_and_writes_a_png(dataset):
    output, run = dataset
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "files: 9 seen, 6 kept, 3 dropped | clips: 9\ntraining frames: 121 | " in out, out
    # 8 video clips: 6 x 17 + 9 + 9 = 120 frames at 24 fps = 5.0 s; the still adds a frame but no time
    assert "duration: 5.0 s at 24 fps (+1 still(s))" in out

    buckets = table(section(out, "buckets"))
    assert {b: int(cells[0]) for b, cells in buckets.items()} == {
        "17x64x96": 5, "17x96x64": 1, "9x64x96": 2, "1x64x96": 1
    }
    assert buckets["17x64x96"][1] == "55.6%" and set(buckets["17x64x96"][2]) == {"#"}
    assert list(buckets)[0] == "17x64x96"  # largest first

    frames = table(section(out, "frames per clip"))
    assert {int(f): int(cells[0]) for f, cells in frames.items()} == {1: 1, 9: 2, 17: 6}
    assert "at batch size 1 every clip is trained every epoch" in out

    sources = table(section(out, "clips per source file"))
    assert section(out, "clips per source file") and "6 source(s)" in out
    assert sources["long.mp4"] == ["3", "max"] and sources["medium.mp4"] == ["2"]
    assert sources["still.png"] == ["1", "min"]
    assert list(sources)[:2] == ["long.mp4", "medium.mp4"]
    assert "max 3 clip(s): long.mp4" in out

    assert section(out, "missing captions: 1 clip(s)") == ["  nocap.mp4"]

    dropped = section(out, "dropped files: 3")
    row = {line.split("  ")[0]: line for line in dropped[2:]}
    assert "empty.mp4" in row["empty file (0 bytes)"] and "tiny.mp4" in row["too short"]
    assert "notes.md" in row["not a video or image (.md)"]
    paths = ("dataset: ", "source: ", "wrote plot: ")  # printed whole, however long
    assert all(len(line) <= 100 for line in out.splitlines() if not line.startswith(paths)), out

    plot = output / "inspect.png"
    assert f"wrote plot: {plot}" in out
    with Image.open(plot) as image:
        image.verify()
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300


def test_batch_size_names_the_clips_no_batch_holds_and_a_closed_pipe_is_no_traceback(dataset, tmp_path):
    output, _ = dataset
    plot = str(tmp_path / "p.png")
    run = run_script("data_tools/inspect_dataset.py", str(output), "--batch-size", "2", "--plot", plot)
    assert run.returncode == 0, run.stderr
    # 17x64x96 holds 5 (2 batches, 1 left over), 9x64x96 2 (1 batch); the portrait clip and the still alone
    assert ("note: at batch size 2 on 1 process(es): 2 clip(s) in 2 bucket(s) smaller than a batch are never "
            "trained (17x96x64: 1, 1x64x96: 1;") in run.stdout
    assert "1 clip(s) per epoch are left out as bucket remainders" in run.stdout

    import subprocess
    import sys

    # `| true` closes the pipe before the report is printed (`| head` does so at some point after its lines).
    piped = subprocess.run(f"'{sys.executable}' data_tools/inspect_dataset.py '{output}' --plot '{tmp_path}/q.png' "
                           "| true", shell=True, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert piped.returncode == 0 and piped.stderr == ""


def test_plot_path_option_and_everything_dropped(tmp_path):
    source, output = tmp_path / "source", tmp_path / "dataset"
    (source / "zero.mp4").parent.mkdir(parents=True)
    (source / "zero.mp4").write_bytes(b"")
    (source / "zero.txt").write_text("caption")
    write_video(source / "short.mp4", 6, 24)
    with pytest.raises(UserInputError, match="no usable clips"):
        make_dataset(source, output)
    assert (output / "report.json").is_file() and not (output / "manifest.parquet").exists()

    plot = tmp_path / "plots" / "drops.png"
    run = run_script("data_tools/inspect_dataset.py", str(output), "--plot", str(plot))
    assert run.returncode == 0, run.stderr
    assert "files: 2 seen, 0 kept, 2 dropped | clips: 0" in run.stdout
    assert "no clips: manifest.parquet is missing" in run.stdout
    dropped = section(run.stdout, "dropped files: 2")
    assert any(line.startswith("empty file (0 bytes)") and "zero.mp4" in line for line in dropped)
    assert any(line.startswith("too short") and "short.mp4" in line for line in dropped)
    with Image.open(plot) as image:
        assert image.width > 400
    assert not (output / "inspect.png").exists()


def test_not_a_dataset_folder_is_one_clear_error(tmp_path):
    (tmp_path / "stray.txt").write_text("hello")
    for folder in (tmp_path, tmp_path / "missing"):
        run = run_script("data_tools/inspect_dataset.py", str(folder))
        assert run.returncode == 2
        assert run.stderr.startswith("error: ") and "not a clip dataset folder" in run.stderr
        assert "run prepare_clips" in run.stderr
        assert "Traceback" not in run.stderr


def test_load_dataset_folder_error_and_manifest_without_report(dataset, tmp_path):
    with pytest.raises(UserInputError, match="not a clip dataset folder"):
        load_dataset_folder(tmp_path)
    output, _ = dataset
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.parquet").write_bytes((output / "manifest.parquet").read_bytes())
    rows, report = load_dataset_folder(copy)
    assert len(rows) == 9 and report["dropped"] == [] and report["files_kept"] == 6


def row(source, frames, bucket, caption="c", fps=24.0):
    return {"source": source, "num_frames": frames, "bucket": bucket, "caption": caption, "target_fps": fps}


ROWS = [
    row("/d/a.mp4", 17, "17x64x96"),
    row("/d/a.mp4", 17, "17x64x96"),
    row("/d/a.mp4", 17, "17x64x96", caption=""),
    row("/d/b.mp4", 13, "13x64x96"),
    row("/d/c.mp4", 17, "17x96x64", caption="  "),
    row("/d/s.png", 1, "1x64x96", fps=0.0),
]


def test_histograms_count_and_order():
    assert bucket_histogram(ROWS) == [("17x64x96", 3), ("1x64x96", 1), ("13x64x96", 1), ("17x96x64", 1)]
    assert frame_histogram(ROWS) == [(1, 1), (13, 1), (17, 4)]
    assert clips_per_source(ROWS) == [("/d/a.mp4", 3), ("/d/b.mp4", 1), ("/d/c.mp4", 1), ("/d/s.png", 1)]
    assert missing_captions(ROWS) == (2, ["/d/a.mp4", "/d/c.mp4"])
    assert bucket_histogram([]) == [] and frame_histogram([]) == []


def test_summary_counts_frames_and_duration():
    report = {"files_seen": 6, "files_kept": 4, "dropped": [{"source": "/d/x.mp4", "reason": "too short: 3"}]}
    summary = summarize(ROWS, report)
    assert summary["clips"] == 6 and summary["frames"] == 82 and summary["stills"] == 1
    assert summary["seconds"] == pytest.approx(81 / 24) and summary["target_fps"] == [24.0]
    assert summary["files_dropped"] == 1


def test_drop_reasons_group_by_kind():
    assert reason_kind("too short: 6 frames at 24 fps give 6 frames at 24 fps, fewer than min_frames=9") == "too short"
    assert reason_kind("cannot open as video: [00:01] moov atom not found") == "cannot open as video"
    assert reason_kind("empty file (0 bytes)") == "empty file (0 bytes)"
    no_caption = "no caption (sidecar .txt or captions.jsonl/csv entry)"
    assert reason_kind(no_caption) == no_caption
    assert reason_kind("same content as /data/clips/a.mp4") == "same content as another file"
    not_utf8 = "caption file x.txt is not UTF-8 text (invalid start byte at byte 3)"
    assert reason_kind(not_utf8) == "caption file is not UTF-8"
    dropped = [
        {"source": "/d/1.mp4", "reason": "too short: 6 frames"},
        {"source": "/d/2.mp4", "reason": "empty file (0 bytes)"},
        {"source": "/d/3.mp4", "reason": "too short: 4 frames"},
        {"source": "/d/4.mp4", "reason": "same content as /d/1.mp4"},
        {"source": "/d/5.mp4", "reason": "same content as /d/2.mp4"},
        {"source": "/d/6.mp4", "reason": "too short: 2 frames"},
    ]
    assert group_dropped(dropped) == [
        ("too short", ["/d/1.mp4", "/d/3.mp4", "/d/6.mp4"]),
        ("same content as another file", ["/d/4.mp4", "/d/5.mp4"]),
        ("empty file (0 bytes)", ["/d/2.mp4"]),
    ]
    assert group_dropped([]) == []


def test_report_text_stays_within_100_columns_and_caps_examples():
    long_name = "/d/" + "x" * 150 + ".mp4"
    rows = [row(f"/d/src_{i:02d}.mp4", 17, "17x64x96", caption="") for i in range(14)]
    rows.append(row(long_name, 9, "9x64x96"))
    dropped = [{"source": f"bad_{i}.mp4", "reason": "cannot open as video: moov atom not found"} for i in range(8)]
    text = render_report(rows, {"files_seen": 23, "files_kept": 15, "dropped": dropped, "notes": ["n" * 300]})
    assert all(len(line) <= 100 for line in text.splitlines()), max(text.splitlines(), key=len)
    assert "15 source(s), top 10" in text and "... and 4 more source file(s)" in text
    [line] = [each for each in text.splitlines() if each.startswith("cannot open as video")]
    assert "bad_0.mp4" in line and "bad_4.mp4" in line and "bad_5.mp4" not in line and "+3 more" in line
    assert format_table(["a", "n"], [["xx", 1], ["y", 22]], "lr") == ["a    n", "--  --", "xx   1", "y   22"]
    json.dumps(summarize(rows, {}))  # plain values only
