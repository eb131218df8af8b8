"""A dry-run look at a clip dataset folder: what made it in, in which shapes, and what was dropped and why.

Everything here is a small function over the manifest rows (plain dicts) and the report.json dict, so it can be
tested without a terminal or a display. `render_report` gives the text tables; `write_plot` the PNG.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from happyhorse_train.data.prepare import MANIFEST_FILE, REPORT_JSON, load_manifest
from happyhorse_train.data.sampler import unused_clips
from happyhorse_train.errors import UserInputError

LINE_WIDTH = 100
BAR_WIDTH = 40
TOP_SOURCES, MISSING_CAPTION_EXAMPLES, DROPPED_EXAMPLES = 10, 10, 5
_COLUMNS = ["source", "num_frames", "bucket", "caption", "target_fps"]
_OPTIONAL_COLUMNS = ["mask", "first_frame"]  # (a manifest written before loss masks / first frames has none)

# Reasons that carry a file name or path before any ':' would otherwise give one group per file.
_KIND_PATTERNS = [
    (re.compile(r"^same content as "), "same content as another file"),
    (re.compile(r"^caption file .+ is not UTF-8"), "caption file is not UTF-8"),
    (re.compile(r"^caption file .+ cannot be read"), "caption file cannot be read"),
    (re.compile(r"^cannot decode frames "), "cannot decode frames"),
]


# ---------------------------------------------------------------------------------------------- loading
def load_dataset_folder(folder: str | Path) -> tuple[list[dict], dict]:
    """The manifest rows (only the columns the report needs) and report.json of a clip dataset folder.

    A folder where every file was dropped has report.json but no manifest: that gives no rows. A manifest without
    report.json (an older or hand-made folder) gives a report rebuilt from the rows, with nothing dropped.
    """
    folder = Path(folder)
    manifest_path, report_path = folder / MANIFEST_FILE, folder / REPORT_JSON
    if not manifest_path.is_file() and not report_path.is_file():
        raise UserInputError(
            f"{folder} is not a clip dataset folder (no {MANIFEST_FILE} or {REPORT_JSON}); run prepare_clips first"
        )
    rows: list[dict] = []
    if manifest_path.is_file():
        try:
            manifest = load_manifest(folder)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            if isinstance(error, UserInputError):
                raise
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0].strip("'\"")
            raise UserInputError(f"cannot read {manifest_path}: {first_line}") from error
        missing = [c for c in _COLUMNS if c not in manifest.column_names]
        if missing:
            raise UserInputError(f"{manifest_path} lacks the column(s) {', '.join(missing)}; run prepare_clips again")
        present = [c for c in _OPTIONAL_COLUMNS if c in manifest.column_names]
        rows = manifest.select_columns(_COLUMNS + present).to_list()
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as error:
            raise UserInputError(f"{report_path} is not readable JSON: {error}") from error
        if not isinstance(report, dict):
            raise UserInputError(f"{report_path} is not a JSON object")
    else:
        kept = len({row["source"] for row in rows})
        report = {"files_seen": kept, "files_kept": kept, "clips": len(rows), "dropped": []}
        report["notes"] = [f"{REPORT_JSON} missing: file counts are of the kept files only"]
    return rows, report


# ---------------------------------------------------------------------------------------------- counting
def bucket_sort_key(bucket: str) -> tuple:
    """'17x64x96' sorts as (17, 64, 96); anything else after those, by text."""
    try:
        return (0, *(int(part) for part in bucket.split("x")), "")
    except ValueError:
        return (1, 0, 0, 0, bucket)


def bucket_histogram(rows: list[dict]) -> list[tuple[str, int]]:
    """(bucket, clips) for every bucket used, largest first; ties by frames, height, width."""
    counts = Counter(row["bucket"] for row in rows)
    return sorted(counts.items(), key=lambda item: (-item[1], bucket_sort_key(item[0])))


def frame_histogram(rows: list[dict]) -> list[tuple[int, int]]:
    """(num_frames, clips) in increasing num_frames."""
    return sorted(Counter(int(row["num_frames"]) for row in rows).items())


def clips_per_source(rows: list[dict]) -> list[tuple[str, int]]:
    """(source path, clips) for every source, most clips first; ties in path order."""
    counts = Counter(row["source"] for row in rows)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def missing_captions(rows: list[dict]) -> tuple[int, list[str]]:
    """How many clips have an empty caption, and their distinct source paths in manifest order."""
    empty = [row["source"] for row in rows if not (row.get("caption") or "").strip()]
    return len(empty), list(dict.fromkeys(empty))


def reason_kind(reason: str) -> str:
    """The group a drop reason belongs to: the text before its first ':', less any file name in it."""
    for pattern, kind in _KIND_PATTERNS:
        if pattern.search(reason):
            return kind
    return reason.split(":", 1)[0].strip() or "(no reason given)"


def group_dropped(dropped: list[dict]) -> list[tuple[str, list[str]]]:
    """(reason kind, source paths) per kind, the largest group first; ties by kind."""
    groups: dict[str, list[str]] = {}
    for entry in dropped:
        groups.setdefault(reason_kind(str(entry.get("reason", ""))), []).append(str(entry.get("source", "")))
    return sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))


def _fps(row: dict) -> float:
    return float(row.get("target_fps") or 0.0)


def summarize(rows: list[dict], report: dict) -> dict:
    """The counts of the summary line. Stills (target_fps 0) add frames but no duration."""
    dropped = report.get("dropped") or []
    videos = [row for row in rows if _fps(row) > 0]
    return {
        "files_seen": int(report.get("files_seen", 0)),
        "files_kept": int(report.get("files_kept", len({row["source"] for row in rows}))),
        "files_dropped": len(dropped),
        "clips": len(rows),
        "frames": sum(int(row["num_frames"]) for row in rows),
        "seconds": sum(int(row["num_frames"]) / _fps(row) for row in videos),
        "stills": len(rows) - len(videos),
        "target_fps": sorted({_fps(row) for row in videos}),
    }


# ---------------------------------------------------------------------------------------------- text
def file_name(source: str) -> str:
    return Path(source).name or source


def shorten(text: str, width: int) -> str:
    """`text` cut in the middle with '...' to at most `width` characters (keeps a file's suffix visible)."""
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    head = (width - 3) // 2
    return text[:head] + "..." + text[len(text) - (width - 3 - head) :]


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def text_bar(count: int, largest: int, width: int = BAR_WIDTH) -> str:
    if largest <= 0 or count <= 0:
        return ""
    return "#" * max(1, round(width * count / largest))


def format_table(headers: list[str], rows: list[list[object]], align: str | None = None) -> list[str]:
    """Plain-text table lines; `align` has one 'l' or 'r' per column (default: left). The last column is not
    padded, so a bar or a list of names there adds no trailing spaces."""
    cells = [[str(cell) for cell in row] for row in rows]
    align = align or "l" * len(headers)
    widths = [max([len(headers[i])] + [len(row[i]) for row in cells]) for i in range(len(headers))]

    def cell(i: int, value: str, last: bool) -> str:
        if align[i] == "r":
            return value.rjust(widths[i])
        return value if last else value.ljust(widths[i])

    def line(values: list[str]) -> str:
        return "  ".join(cell(i, value, i == len(values) - 1) for i, value in enumerate(values)).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(row) for row in cells]


def summary_line(summary: dict) -> str:
    """Two lines: files and clips, then frames and duration (one would pass 100 columns on big datasets)."""
    fps = summary["target_fps"]
    at = f" at {fps[0]:g} fps" if len(fps) == 1 else (f" at {', '.join(f'{f:g}' for f in fps)} fps" if fps else "")
    stills = f" (+{summary['stills']} still(s))" if summary["stills"] else ""
    return (
        f"files: {summary['files_seen']} seen, {summary['files_kept']} kept, {summary['files_dropped']} dropped | "
        f"clips: {summary['clips']}\n"
        f"training frames: {summary['frames']} | duration: {format_duration(summary['seconds'])}{at}{stills}"
    )


def _section(title: str) -> list[str]:
    return ["", title, "=" * len(title)]


def render_report(
    rows: list[dict], report: dict, folder: str | Path | None = None, batch_size: int = 1, processes: int = 1
) -> str:
    """The whole terminal report: summary, buckets, frame counts, clips no batch of `batch_size` holds, sources,
    captions, drops."""
    lines = []
    if folder is not None:
        lines.append(f"dataset: {folder}")
    if report.get("source"):
        lines.append(f"source:  {report['source']}")
    lines.append(summary_line(summarize(rows, report)))

    if not rows:
        lines += ["", f"no clips: {MANIFEST_FILE} is missing, every file was dropped (reasons below)"]
    else:
        buckets = bucket_histogram(rows)
        lines += _section(f"buckets (frames x height x width): {len(buckets)} used")
        lines += _share_table("bucket", buckets, len(rows), "lrrl")
        unused = unused_clips(dict(buckets), batch_size, processes).line(batch_size, processes, "lower the batch size")
        lines += ["", f"note: {unused}" if unused else f"at batch size {batch_size} every clip is trained every epoch"]
        lines += _section("frames per clip")
        lines += _share_table("frames", frame_histogram(rows), len(rows), "rrrl")
        lines += _source_lines(rows)
        lines += _caption_lines(rows)
        lines += _sidecar_lines(rows, "mask", "loss masks", "no clip has one: every clip trains everywhere")
        lines += _sidecar_lines(rows, "first_frame", "first-frame images",
                                "no clip has one: an image-to-video model is conditioned on each clip's frame 0")

    dropped = report.get("dropped") or []
    groups = group_dropped(dropped)
    lines += _section(f"dropped files: {len(dropped)}")
    if groups:
        kinds = [_cut(kind, 40) for kind, _ in groups]
        room = LINE_WIDTH - max(len("reason"), *map(len, kinds)) - len("  files  ")  # what the examples may use
        table = [
            [kind, len(paths), _name_list(paths, DROPPED_EXAMPLES, room)]  # (relative to the source folder)
            for kind, (_, paths) in zip(kinds, groups)
        ]
        lines += format_table(["reason", "files", "examples"], table, "lrl")
    else:
        lines.append("nothing dropped")

    notes = report.get("notes") or []
    if notes:
        lines += _section(f"notes: {len(notes)}")
        lines += [f"  {shorten(str(note), LINE_WIDTH - 2)}" for note in notes]
    return "\n".join(lines) + "\n"


def _share_table(what: str, histogram: list[tuple[object, int]], clips: int, align: str) -> list[str]:
    """(value, clips) pairs as a table with each one's share of all clips and a bar."""
    largest = max(n for _, n in histogram)
    table = [[value, n, f"{100 * n / clips:.1f}%", text_bar(n, largest)] for value, n in histogram]
    return format_table([what, "clips", "share", ""], table, align)


def _source_lines(rows: list[dict]) -> list[str]:
    sources = clips_per_source(rows)
    most, fewest = sources[0][1], sources[-1][1]
    shown = sources[:TOP_SOURCES]
    lines = _section(f"clips per source file: {len(sources)} source(s), top {len(shown)}")
    flags = {} if most == fewest else {most: "max", fewest: "min"}
    table = [[shorten(file_name(s), 70), n, flags.get(n, "")] for s, n in shown]
    lines += format_table(["file", "clips", "flag"], table, "lrl")
    if most == fewest:
        return [*lines, f"every source gives {most} clip(s)"]
    for flag, count in (("max", most), ("min", fewest)):
        lines.append(f"{flag} {count} clip(s): {_name_list([file_name(s) for s, n in sources if n == count], 3, 80)}")
    return lines


def _caption_lines(rows: list[dict]) -> list[str]:
    count, empty_sources = missing_captions(rows)
    origin = f" from {len(empty_sources)} source file(s)" if count else ""
    lines = _section(f"missing captions: {count} clip(s){origin}")
    if not count:
        return [*lines, "every clip has a caption"]
    lines += [f"  {shorten(file_name(s), LINE_WIDTH - 2)}" for s in empty_sources[:MISSING_CAPTION_EXAMPLES]]
    if len(empty_sources) > MISSING_CAPTION_EXAMPLES:
        lines.append(f"  ... and {len(empty_sources) - MISSING_CAPTION_EXAMPLES} more source file(s)")
    return lines


def _sidecar_lines(rows: list[dict], column: str, title: str, when_none: str) -> list[str]:
    """Which source files carry a file of theirs beside them: a loss mask (data/loss_masks.py) or a first-frame
    image (data/first_frames.py), named in the manifest's `column`."""
    sources = list(dict.fromkeys(row["source"] for row in rows if row.get(column)))
    lines = _section(f"{title}: {len(sources)} source file(s)")
    if not sources:
        return [*lines, when_none]
    return [*lines, f"  {_name_list([file_name(s) for s in sources], MISSING_CAPTION_EXAMPLES, LINE_WIDTH - 2)}"]


def _name_list(names: list[str], limit: int, width: int) -> str:
    """Up to `limit` whole names, as many as fit in `width` characters with a '+N more' for the rest."""
    shown: list[str] = []
    for index, name in enumerate(names[:limit]):
        name = shorten(name, 40)
        rest = len(names) - index - 1
        tail = f" +{rest} more" if rest else ""
        if shown and len(", ".join([*shown, name]) + tail) > width:
            break
        shown.append(name)
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" +{more} more" if more else "")


def _cut(text: str, width: int) -> str:
    """`text` cut at the end with '...' to at most `width` characters."""
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


# ---------------------------------------------------------------------------------------------- plot
def write_plot(rows: list[dict], report: dict, path: str | Path, title: str | None = None) -> Path:
    """One PNG with four panels: buckets, frames per clip, clips per source, drops by reason.

    Drawn on matplotlib's Agg canvas directly (no pyplot), so it needs no display and leaves the caller's
    matplotlib backend and pyplot figure list untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(13, 9))
    FigureCanvasAgg(fig)
    (ax_buckets, ax_frames), (ax_sources, ax_dropped) = fig.subplots(2, 2)

    if rows:
        buckets = bucket_histogram(rows)
        shown = sorted(buckets[:20], key=lambda item: bucket_sort_key(item[0]))
        _label(ax_buckets, ax_buckets.bar(range(len(shown)), [n for _, n in shown], color="tab:blue"))
        _category_ticks(ax_buckets, [b for b, _ in shown], crowded=5)
        more = f" (20 largest of {len(buckets)})" if len(buckets) > 20 else ""
        ax_buckets.set(title=f"clips per bucket{more}", xlabel="bucket (frames x height x width)", ylabel="clips")

        frames = frame_histogram(rows)
        _label(ax_frames, ax_frames.bar(range(len(frames)), [n for _, n in frames], color="tab:green"))
        _category_ticks(ax_frames, [str(f) for f, _ in frames], crowded=14)
        ax_frames.set(title="clips per frame count", xlabel="frames per clip", ylabel="clips")

        per_source = Counter(n for _, n in clips_per_source(rows))
        counts = sorted(per_source)  # a true number line: a gap shows that no source gives that many clips
        _label(ax_sources, ax_sources.bar(counts, [per_source[c] for c in counts], color="tab:purple"))
        if len(counts) <= 15:
            ax_sources.set_xticks(counts)  # one tick per bar: the auto locator gives 1.6 ... 2.4 for a lone bar
        else:
            ax_sources.xaxis.get_major_locator().set_params(integer=True)
        ax_sources.set(title=f"clips per source file ({sum(per_source.values())} sources)",
                       xlabel="clips from one source file", ylabel="source files")
        for ax in (ax_buckets, ax_frames, ax_sources):
            ax.yaxis.get_major_locator().set_params(integer=True)
    else:
        names = ["clips per bucket", "clips per frame count", "clips per source file"]
        for ax, name in zip((ax_buckets, ax_frames, ax_sources), names):
            _empty_panel(ax, name, "no clips (everything was dropped)")

    groups = group_dropped(report.get("dropped") or [])
    if groups:
        shown = groups[:15][::-1]  # largest at the top
        bars = ax_dropped.barh(range(len(shown)), [len(paths) for _, paths in shown], color="tab:red")
        _label(ax_dropped, bars, "x")
        ax_dropped.set_yticks(range(len(shown)), [_cut(kind, 34) for kind, _ in shown])
        ax_dropped.xaxis.get_major_locator().set_params(integer=True)
        more = f" (15 largest of {len(groups)} reasons)" if len(groups) > 15 else ""
        ax_dropped.set(title=f"dropped files by reason{more}", xlabel="files")
    else:
        _empty_panel(ax_dropped, "dropped files by reason", "nothing dropped")

    summary = summarize(rows, report)
    counts = (f"{summary['clips']} clips from {summary['files_kept']} of {summary['files_seen']} files, "
              f"{summary['files_dropped']} dropped; {summary['frames']} training frames, "
              f"{format_duration(summary['seconds'])}")
    fig.suptitle((f"{shorten(title, 110)}\n" if title else "") + counts, fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    fig.clear()
    return path


def _label(ax, bars, axis: str = "y") -> None:
    """Write each bar's count at its end, with headroom so the label stays inside the panel."""
    if len(bars) <= 24:  # more labels than that run into each other
        ax.bar_label(bars, padding=2, fontsize=9)
    values = [bar.get_width() if axis == "x" else bar.get_height() for bar in bars]
    (ax.set_xlim if axis == "x" else ax.set_ylim)(0, max(values) * 1.12 or 1)


def _category_ticks(ax, labels: list[str], crowded: int) -> None:
    """One tick per bar; upright while they fit, then turned, then turned and smaller."""
    turned = {} if len(labels) <= crowded else {"rotation": 90, "fontsize": 8 if len(labels) > 2 * crowded else 9}
    ax.set_xticks(range(len(labels)), labels, **turned)


def _empty_panel(ax, title: str, message: str) -> None:
    ax.set(title=title, xticks=[], yticks=[])
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, color="0.4", transform=ax.transAxes)
