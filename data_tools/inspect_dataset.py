"""Dry-run report of a clip dataset folder made by prepare_clips: what is in it, and what was dropped and why.

    python data_tools/inspect_dataset.py DATASET [--plot PATH]

Prints a summary line and tables of buckets, frames per clip, clips per source file, missing captions and
dropped files grouped by reason; writes the same as a PNG (default DATASET/inspect.png). Reads only
manifest.parquet and report.json, so it works on a folder where every file was dropped too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from happyhorse_train.data.inspect import load_dataset_folder, render_report, write_plot  # noqa: E402
from happyhorse_train.data.prepare import PLOT_FILE  # noqa: E402
from happyhorse_train.errors import UserInputError, report_user_errors  # noqa: E402


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="clip dataset folder written by prepare_clips")
    parser.add_argument("--plot", type=Path, help=f"PNG to write (default DATASET/{PLOT_FILE})")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="training's data.batch_size, to say which clips no batch will hold (default 1)")
    parser.add_argument("--processes", type=int, default=1, help="training processes (default 1)")
    args = parser.parse_args(argv)

    if not args.dataset.is_dir():
        raise UserInputError(f"{args.dataset} is not a clip dataset folder (no such folder); run prepare_clips first")
    rows, report = load_dataset_folder(args.dataset)
    if args.batch_size < 1 or args.processes < 1:
        raise UserInputError("--batch-size and --processes must be 1 or more")
    print(render_report(rows, report, args.dataset, args.batch_size, args.processes), end="")
    plot = args.plot or args.dataset / PLOT_FILE
    try:
        write_plot(rows, report, plot, title=str(args.dataset))
    except OSError as error:
        raise UserInputError(f"cannot write the plot {plot}: {error.strerror or error}") from error
    print(f"\nwrote plot: {plot}")


if __name__ == "__main__":
    main()
