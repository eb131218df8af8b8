"""Make a clip dataset folder from a folder of videos (mp4, mov, webm, mkv) and still images.

    python data_tools/prepare_clips.py SOURCE OUTPUT [--mode uniform --num-windows 4] [--bucket 49x480x720 ...]

Buckets (docs/data.md): by default seven frame counts (17 to 121) by seven aspect ratios of 720x480's area; a
video takes the nearest aspect ratio and the longest frame count it fills. A re-run into the same OUTPUT decodes
only new or changed files; with other rules it is refused unless --replace.

Captions come from a sidecar <name>.txt beside each file, else captions.jsonl ({"file", "caption"} per
line) or captions.csv (columns file,caption) in SOURCE. OUTPUT gets manifest.parquet and report.txt /
report.json listing every dropped file with its reason. Exits 0 unless no usable clip remains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from happyhorse_train.data.clip_rules import DEFAULT_FRAME_COUNTS, Bucket, ClipRules, aspect_sizes  # noqa: E402
from happyhorse_train.data.prepare import (  # noqa: E402
    check_source,
    open_output_folder,
    prepare_clips,
    write_dataset_folder,
)
from happyhorse_train.data.sampler import unused_clips  # noqa: E402
from happyhorse_train.errors import UserInputError, report_user_errors  # noqa: E402


def parse_bucket(text: str) -> Bucket:
    try:
        frames, height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bucket {text!r} is not FRAMESxHEIGHTxWIDTH, e.g. 121x480x720") from None
    return Bucket(frames, height, width)


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="folder of videos and images (searched recursively)")
    parser.add_argument("output", type=Path, help="clip dataset folder to write")
    parser.add_argument("--fps", type=float, default=24.0, help="target frame rate (default 24)")
    parser.add_argument("--min-frames", type=int, default=17, help="drop videos shorter than this, 4k+1 (default 17)")
    parser.add_argument("--mode", choices=["head", "uniform", "sliding"], default="head", help="which windows")
    parser.add_argument("--num-windows", type=int, default=3, help="uniform: windows per video (default 3)")
    parser.add_argument("--stride", type=int, default=0, help="sliding: frames between starts (default: clip length)")
    parser.add_argument(
        "--bucket",
        type=parse_bucket,
        action="append",
        help=f"FRAMESxHEIGHTxWIDTH, repeatable (default: frames {','.join(map(str, DEFAULT_FRAME_COUNTS))} by sizes "
        f"{', '.join(f'{h}x{w}' for h, w in aspect_sizes())})",
    )
    parser.add_argument("--replace", action="store_true", help="replace a dataset in OUTPUT made with other rules")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="training's data.batch_size, to report clips no batch will hold (default 1)")
    parser.add_argument(
        "--missing-caption",
        choices=["drop", "empty"],
        default="drop",
        help="no caption: drop the file or train it with an empty caption",
    )
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (default: up to 8)")
    args = parser.parse_args(argv)

    try:
        rules = ClipRules(
            target_fps=args.fps,
            min_frames=args.min_frames,
            mode=args.mode,
            num_windows=args.num_windows,
            stride=args.stride,
            missing_caption=args.missing_caption,
            **({"buckets": args.bucket} if args.bucket else {}),
        )
    except ValueError as error:
        raise UserInputError(str(error)) from error
    source = check_source(args.source)
    known = open_output_folder(args.output, source, rules, args.replace)
    result = prepare_clips(source, rules, num_workers=args.workers, known=known)
    unused = unused_clips([row["bucket"] for row in result.rows], args.batch_size).line(
        args.batch_size, fix="lower data.batch_size, or prepare with fewer --bucket sizes"
    )
    if unused:
        result.notes.append(unused)
    write_dataset_folder(result, source, args.output, rules)
    kept = len({row["source"] for row in result.rows})
    report = args.output / "report.txt"
    if known:
        print(f"decoded {result.files_probed} new or changed file(s); the others as the previous run found them")
    print(f"{len(result.rows)} clips from {kept} files; {len(result.dropped)} dropped (see {report})")
    if unused:
        print(f"note: {unused}")
    print(f"wrote {args.output / 'manifest.parquet'}")


if __name__ == "__main__":
    main()
