"""Turn a folder of videos and stills into a clip dataset folder: a manifest and a report of what was dropped.

The folder holds:
  manifest.parquet   one row per clip (load with `load_manifest` or datasets.Dataset.from_parquet)
  report.json        every dropped file / clip with its reason, and the counts
  report.txt         the same for people
  rules.json         the rules the manifest was made with
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from happyhorse_train.data.captions import CaptionError, CaptionIndex
from happyhorse_train.data.clip_rules import ClipRules, nearest_bucket, plan_clips, source_frame_indices
from happyhorse_train.data.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, UnreadableMedia, probe
from happyhorse_train.errors import UserInputError
from happyhorse_train.files import file_digest, write_atomic

MANIFEST_FILE, REPORT_JSON, REPORT_TEXT, RULES_FILE = "manifest.parquet", "report.json", "report.txt", "rules.json"
_SIDE_FILES = {"captions.jsonl", "captions.csv"}


@dataclass
class Dropped:
    source: str
    reason: str


@dataclass
class PrepareResult:
    rows: list[dict] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # problems that dropped nothing by themselves
    files_seen: int = 0


def _clip_id(*parts: object) -> str:
    return hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).hexdigest()


def clips_of_file(path: Path, caption: str, rules: ClipRules) -> tuple[list[dict], str | None]:
    """The manifest rows of one media file, or the reason it yields none. Runs in a worker process."""
    try:
        info = probe(path)
    except UnreadableMedia as error:
        return [], str(error)
    content = file_digest(path)
    if info.is_still:
        bucket = nearest_bucket(info.width, info.height, rules.buckets, still=True)
        clip_frames, starts, span = 1, [0], 1
    else:
        plan = plan_clips(info.num_frames, info.fps, info.width, info.height, rules)
        if isinstance(plan, str):
            return [], plan
        bucket, clip_frames, starts = plan
        span = source_frame_indices(0, clip_frames, info.fps, rules.target_fps)[-1] + 1
    rows = []
    for start in starts:
        rows.append(
            {
                "clip_id": _clip_id(content, start, clip_frames, rules.target_fps, bucket.height, bucket.width),
                "source": str(path),
                "fingerprint": content,
                "start_frame": start,
                "num_frames": clip_frames,
                "source_span": span,
                "source_frames": info.num_frames,
                "source_fps": info.fps,
                "target_fps": float(rules.target_fps) if not info.is_still else 0.0,
                "width": info.width,
                "height": info.height,
                "bucket": f"{clip_frames}x{bucket.height}x{bucket.width}",
                "bucket_height": bucket.height,
                "bucket_width": bucket.width,
                "caption": caption,
            }
        )
    return rows, None


def find_media(root: Path) -> tuple[list[Path], list[Dropped]]:
    media, ignored = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or path.name in _SIDE_FILES:
            continue
        suffix = path.suffix.lower()
        if suffix in VIDEO_SUFFIXES or suffix in IMAGE_SUFFIXES:
            media.append(path)
        elif suffix != ".txt":
            ignored.append(Dropped(str(path), f"not a video or image ({suffix or 'no suffix'})"))
    return media, ignored


def prepare_clips(source: Path, rules: ClipRules, num_workers: int = 0, progress: bool = True) -> PrepareResult:
    """Scan `source`, caption and probe every file, and plan its clips. Writes nothing."""
    source = source.expanduser().resolve()
    if not source.is_dir():
        raise UserInputError(f"source folder not found: {source}")
    media, ignored = find_media(source)
    result = PrepareResult(dropped=ignored, files_seen=len(media) + len(ignored))
    captions = CaptionIndex(source)
    result.notes += [f"{name}: {reason}" for name, reason in captions.problems]

    # Every file is probed, captioned or not: a file that does not decode is reported as such first.
    jobs: list[tuple[Path, str]] = []
    caption_problems: dict[Path, str] = {}
    for path in media:
        try:
            caption = captions.caption_for(path)
        except CaptionError as error:
            caption, caption_problems[path] = "", str(error)
        if caption is None:
            if rules.missing_caption == "drop":
                caption_problems[path] = "no caption (sidecar .txt or captions.jsonl/csv entry)"
            caption = ""
        jobs.append((path, caption))

    workers = num_workers or min(8, os.cpu_count() or 1)
    # spawn, not fork: a forked copy of a process that has started threads (torch, tqdm) can deadlock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(clips_of_file, path, caption, rules): path for path, caption in jobs}
        outcomes = {}
        for future in tqdm(as_completed(futures), total=len(futures), desc="probing files", disable=not progress):
            outcomes[futures[future]] = future.result()

    seen_content: dict[str, str] = {}
    for path, _ in jobs:  # in sorted file order, so the manifest does not depend on which worker finished first
        rows, reason = outcomes[path]
        reason = reason or caption_problems.get(path)
        if reason:
            result.dropped.append(Dropped(str(path), reason))
        elif rows[0]["fingerprint"] in seen_content:
            result.dropped.append(Dropped(str(path), f"same content as {seen_content[rows[0]['fingerprint']]}"))
        else:
            seen_content[rows[0]["fingerprint"]] = str(path)
            result.rows.extend(rows)
    return result


def report_text(result: PrepareResult, source: Path) -> str:
    kept_files = len({row["source"] for row in result.rows})
    lines = [
        f"source: {source}",
        f"files: {result.files_seen} seen, {kept_files} kept, {len(result.dropped)} dropped",
        f"clips: {len(result.rows)}",
    ]
    if result.dropped:
        lines.append("dropped:")
        lines += [f"  {Path(d.source).name}: {d.reason}" for d in result.dropped]
    if result.notes:
        lines.append("notes:")
        lines += [f"  {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def write_dataset_folder(result: PrepareResult, source: Path, output: Path, rules: ClipRules) -> None:
    """Write the report first (it explains an empty result too), then the manifest."""
    output.mkdir(parents=True, exist_ok=True)
    summary = {
        "source": str(source),
        "files_seen": result.files_seen,
        "files_kept": len({row["source"] for row in result.rows}),
        "clips": len(result.rows),
        "dropped": [asdict(d) for d in result.dropped],
        "notes": result.notes,
    }
    write_atomic(output / REPORT_JSON, lambda p: p.write_text(json.dumps(summary, indent=2, ensure_ascii=False)))
    write_atomic(output / REPORT_TEXT, lambda p: p.write_text(report_text(result, source), encoding="utf-8"))
    write_atomic(output / RULES_FILE, lambda p: p.write_text(json.dumps(asdict(rules), indent=2)))
    if not result.rows:
        raise UserInputError(
            f"no usable clips in {source}: {len(result.dropped)} file(s) dropped, reasons in {output / REPORT_TEXT}"
        )
    from datasets import Dataset

    write_atomic(output / MANIFEST_FILE, lambda p: Dataset.from_list(result.rows).to_parquet(str(p)))


def load_manifest(folder: str | Path):
    """The manifest of a clip dataset folder as a `datasets.Dataset`."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise UserInputError(f"{folder} is not a clip dataset folder ({MANIFEST_FILE} is missing); run prepare_clips")
    from datasets import Dataset

    return Dataset.from_parquet(str(path))
