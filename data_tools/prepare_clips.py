"""Make a clip dataset folder from a folder of videos (mp4, mov, webm, mkv) and still images.

    python data_tools/prepare_clips.py SOURCE OUTPUT [--mode uniform --num-windows 4] [--bucket 49x480x720 ...]

Captions come from a sidecar <name>.txt beside each file, else captions.jsonl ({"file", "caption"} per
line) or captions.csv (columns file,caption) in SOURCE. OUTPUT gets manifest.parquet and report.txt /
report.json listing every dropped file with its reason. Exits 0 unless no usable clip remains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from happyhorse_train.data.clip_rules import Bucket, ClipRules  # noqa: E402
from happyhorse_train.data.prepare import prepare_clips, write_dataset_folder  # noqa: E402
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
        help="FRAMESxHEIGHTxWIDTH, repeatable (default 121x480x720 and 121x720x480)",
    )
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
    result = prepare_clips(args.source, rules, num_workers=args.workers)
    write_dataset_folder(result, args.source.resolve(), args.output, rules)
    kept = len({row["source"] for row in result.rows})
    report = args.output / "report.txt"
    print(f"{len(result.rows)} clips from {kept} files; {len(result.dropped)} dropped (see {report})")
    print(f"wrote {args.output / 'manifest.parquet'}")


if __name__ == "__main__":
    main()
