"""Turn a folder of videos and stills into a clip dataset folder: a manifest and a report of what was dropped.

The folder holds:
  manifest.parquet   one row per clip (load with `load_manifest` or datasets.Dataset.from_parquet)
  report.json        every dropped file / clip with its reason, and the counts
  report.txt         the same for people
  rules.json         the rules the manifest was made with
  probes.json        what decoding each source file told (frames, fps, size, checksum, or why it failed),
                     by path, size and mtime: a re-run decodes only new or changed files
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from happyhorse_train.data.captions import CaptionError, CaptionIndex
from happyhorse_train.data.clip_rules import ClipRules, nearest_bucket, plan_clips, source_frame_indices
from happyhorse_train.data.first_frames import find_first_frame, is_first_frame_file
from happyhorse_train.data.loss_masks import find_mask, is_mask_file
from happyhorse_train.data.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, MediaInfo, UnreadableMedia, probe
from happyhorse_train.errors import UserInputError
from happyhorse_train.files import file_digest, write_atomic

MANIFEST_FILE, REPORT_JSON, REPORT_TEXT, RULES_FILE = "manifest.parquet", "report.json", "report.txt", "rules.json"
PROBES_FILE, PLOT_FILE = "probes.json", "inspect.png"  # what decoding each file told; inspect_dataset's plot
_SIDE_FILES = {"captions.jsonl", "captions.csv"}


class Sidecars(NamedTuple):
    """The files beside a clip that belong to it."""

    mask: Path | None  # its loss mask (loss_masks.py)
    first_frame: Path | None  # its first-frame image (first_frames.py)


@dataclass
class Dropped:
    source: str  # relative to the source folder
    reason: str


@dataclass
class FileProbe:
    """What decoding a file told: its media facts and content fingerprint, or why it does not decode. Kept in
    the dataset folder (PROBES_FILE) by path, size and mtime, so a re-run with the same rules probes only new
    or changed files."""

    size: int
    mtime_ns: int
    fingerprint: str = ""
    num_frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    reason: str | None = None

    def matches(self, path: Path) -> bool:
        stat = path.stat()
        return (self.size, self.mtime_ns) == (stat.st_size, stat.st_mtime_ns)


@dataclass
class PrepareResult:
    rows: list[dict] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # problems that dropped nothing by themselves
    files_seen: int = 0
    probes: dict[str, FileProbe] = field(default_factory=dict)  # by relative path
    files_probed: int = 0  # of them, decoded in this run (the rest were known from a previous run)


def _clip_id(*parts: object) -> str:
    return hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).hexdigest()


def probe_file(path: Path) -> FileProbe:
    """Decode one media file (in a worker process): its facts, or the reason it does not decode."""
    stat = path.stat()
    try:
        info = probe(path)
    except UnreadableMedia as error:
        return FileProbe(stat.st_size, stat.st_mtime_ns, reason=str(error))
    return FileProbe(stat.st_size, stat.st_mtime_ns, file_digest(path), info.num_frames, info.fps, info.width,
                     info.height)


def clips_of_file(path: Path, probed: FileProbe, caption: str, rules: ClipRules) -> tuple[list[dict], str | None]:
    """The manifest rows of one probed media file, or the reason it yields none."""
    if probed.reason:
        return [], probed.reason
    info = MediaInfo(probed.num_frames, probed.fps, probed.width, probed.height)
    if info.is_still:
        bucket = nearest_bucket(info.width, info.height, rules.buckets, still=True)
        clip_frames, starts, span = 1, [0], 1
    else:
        plan = plan_clips(info.num_frames, info.fps, info.width, info.height, rules)
        if isinstance(plan, str):
            return [], plan
        bucket, clip_frames, starts = plan
        span = source_frame_indices(0, clip_frames, info.fps, rules.target_fps)[-1] + 1
    content = probed.fingerprint
    return [
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
        for start in starts
    ], None


def find_media(root: Path) -> tuple[list[Path], list[Dropped]]:
    media, ignored = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or path.name in _SIDE_FILES:
            continue
        suffix = path.suffix.lower()
        if is_mask_file(path) or is_first_frame_file(path):
            continue  # a clip's loss mask or first-frame image (loss_masks.py, first_frames.py), found through it
        if suffix in VIDEO_SUFFIXES or suffix in IMAGE_SUFFIXES:
            media.append(path)
        elif suffix != ".txt":
            ignored.append(Dropped(relative.as_posix(), f"not a video or image ({suffix or 'no suffix'})"))
    return media, ignored


def check_source(source: Path) -> Path:
    """The resolved source folder, or one line saying what is wrong with it."""
    source = source.expanduser().resolve()
    if source.is_file():
        raise UserInputError(f"{source} is a file: give the folder that holds your videos and images")
    if not source.is_dir():
        raise UserInputError(f"source folder not found: {source}")
    return source


def prepare_clips(
    source: Path, rules: ClipRules, num_workers: int = 0, progress: bool = True,
    known: dict[str, FileProbe] | None = None,
) -> PrepareResult:
    """Scan `source`, caption every file, probe the ones `known` (a previous run's probes) does not hold
    unchanged, and plan their clips. Writes nothing."""
    source = check_source(source)
    media, ignored = find_media(source)
    if not media:
        raise UserInputError(
            f"no videos or images in {source} (searched recursively for {', '.join(sorted(VIDEO_SUFFIXES))} and "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}; {len(ignored)} other file(s))"
        )
    result = PrepareResult(dropped=ignored, files_seen=len(media) + len(ignored))
    sidecars = {path: Sidecars(find_mask(path), find_first_frame(path)) for path in media}
    files = media + [side for pair in sidecars.values() for side in pair if side]  # probed like their clips
    names = {path: path.relative_to(source).as_posix() for path in files}
    known = known or {}
    result.probes = {names[p]: known[names[p]] for p in files if names[p] in known and known[names[p]].matches(p)}
    to_probe = [path for path in files if names[path] not in result.probes]
    result.files_probed = len(to_probe)
    workers = min(num_workers or min(8, os.cpu_count() or 1), max(1, len(to_probe)))
    # spawn, not fork: a forked copy of a process that has started threads (torch, tqdm) can deadlock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(probe_file, path): path for path in to_probe}
        for future in tqdm(as_completed(futures), total=len(futures), desc="probing files", disable=not progress):
            result.probes[names[futures[future]]] = future.result()
    plan_rows(result, sidecars, names, CaptionIndex(source), rules)
    return result


def plan_rows(result: PrepareResult, sidecars: dict[Path, Sidecars], names: dict[Path, str],
              captions: CaptionIndex, rules: ClipRules) -> None:
    """Every probed media file's clips or drop reason into `result`, in sorted file order (not the order workers
    finished in); `sidecars` maps each media file to its loss mask and first-frame image (or None). A file that
    does not decode is reported as such before a missing caption."""
    result.notes += [f"{name}: {reason}" for name, reason in captions.problems]
    seen_content: dict[str, str] = {}
    missing = 0
    for path, (mask, first) in sidecars.items():
        try:
            caption, caption_problem = captions.caption_for(path), None
        except CaptionError as error:
            caption, caption_problem = "", str(error)
        if caption is None:
            missing += 1
            if rules.missing_caption == "drop":
                caption_problem = "no caption (an empty sidecar .txt counts as none; or a captions.jsonl/csv entry)"
        rows, reason = clips_of_file(path, result.probes[names[path]], caption or "", rules)
        mask_probe = result.probes[names[mask]] if mask else None
        reason = reason or caption_problem or attach_mask(mask, mask_probe, rows, result.probes[names[path]])
        reason = reason or attach_first_frame(first, result.probes[names[first]] if first else None, rows)
        if reason:
            result.dropped.append(Dropped(names[path], reason))
        elif rows[0]["fingerprint"] in seen_content:
            result.dropped.append(Dropped(names[path], f"same content as {seen_content[rows[0]['fingerprint']]}"))
        else:
            seen_content[rows[0]["fingerprint"]] = names[path]
            result.rows.extend(rows)
    if missing and rules.missing_caption == "empty":
        result.notes.append(f"{missing} file(s) have no caption: kept with an empty one (--missing-caption empty)")
    masked = len({row["source"] for row in result.rows if row["mask"]})
    if masked:
        result.notes.append(f"{masked} file(s) have a loss mask (<name>.mask.png or .mask.mp4): trained where white")
    firsts = len({row["source"] for row in result.rows if row["first_frame"]})
    if firsts:
        result.notes.append(f"{firsts} file(s) have a first-frame image (<name>.first.png): an image-to-video "
                            "model's condition in place of frame 0")


def attach_mask(mask: Path | None, mask_probe: FileProbe | None, rows: list[dict], probed: FileProbe) -> str | None:
    """Give `rows` their file's loss mask (or none); the reason to drop the file when its mask cannot be used."""
    for row in rows:
        row["mask"], row["mask_fingerprint"] = (str(mask), mask_probe.fingerprint) if mask else ("", "")
    if mask is None:
        return None
    if mask_probe.reason:
        return f"its loss mask {mask.name} does not decode: {mask_probe.reason}"
    if (mask_probe.width, mask_probe.height) != (probed.width, probed.height):
        return (f"its loss mask {mask.name} is {mask_probe.width}x{mask_probe.height}, the clip "
                f"{probed.width}x{probed.height}")
    if mask_probe.fps and mask_probe.num_frames < probed.num_frames:  # (a still mask holds for every frame)
        return f"its loss mask {mask.name} has {mask_probe.num_frames} frames, the clip {probed.num_frames}"
    return None


def attach_first_frame(first: Path | None, probed: FileProbe | None, rows: list[dict]) -> str | None:
    """Give the file's clip that starts at its frame 0 the file's first-frame image (other windows open on their
    own frame 0); the reason to drop the file when the image is unreadable."""
    for row in rows:
        opens = first is not None and row["start_frame"] == 0
        row["first_frame"], row["first_frame_fingerprint"] = (str(first), probed.fingerprint) if opens else ("", "")
    if first is not None and probed.reason:
        return f"its first-frame image {first.name} does not decode: {probed.reason}"
    return None


def report_text(result: PrepareResult, source: Path) -> str:
    kept_files = len({row["source"] for row in result.rows})
    lines = [
        f"source: {source}",
        f"files: {result.files_seen} seen, {kept_files} kept, {len(result.dropped)} dropped",
        f"clips: {len(result.rows)}",
    ]
    if result.dropped:
        lines.append("dropped:")
        lines += [f"  {d.source}: {d.reason}" for d in result.dropped]
    if result.notes:
        lines.append("notes:")
        lines += [f"  {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def _rules_record(rules: ClipRules) -> dict:
    return json.loads(json.dumps(asdict(rules)))


def _rule_differences(before: dict, now: dict) -> list[str]:
    changed = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if old != new and key == "buckets":
            added = sum(bucket not in (old or []) for bucket in new)
            changed.append(f"buckets: {len(old or [])} -> {len(new or [])} ({added} new)")
        elif old != new:
            changed.append(f"{key}: {old} -> {new}")
    return changed


def open_output_folder(output: Path, source: Path, rules: ClipRules, replace: bool) -> dict[str, FileProbe]:
    """Check the dataset folder before anything is decoded: one line when it cannot be written or holds a
    dataset made with other rules (unless `replace`). Returns the probes of a previous run on `source`."""
    if output.exists() and not output.is_dir():
        raise UserInputError(f"{output} is a file: give a folder for the dataset (it is made if missing)")
    rules_file = output / RULES_FILE
    if (output / MANIFEST_FILE).exists() and not replace:
        try:
            before = json.loads(rules_file.read_text())
        except (OSError, json.JSONDecodeError):
            before = {}
        differences = _rule_differences(before, _rules_record(rules))
        if differences:
            raise UserInputError(
                f"{output} holds a dataset made with other rules ({'; '.join(differences)}): pass --replace to "
                "replace its manifest, or give another output folder"
            )
    try:
        record = json.loads((output / PROBES_FILE).read_text())
    except (OSError, json.JSONDecodeError):  # none yet, or torn: every file is probed again
        return {}
    if record.get("source") != str(source):
        return {}
    return {name: FileProbe(**probed) for name, probed in record["files"].items()}


def write_dataset_folder(result: PrepareResult, source: Path, output: Path, rules: ClipRules) -> None:
    """Write the probes and the report first (the report explains an empty result too), then the manifest."""
    output.mkdir(parents=True, exist_ok=True)
    probes = {"source": str(source), "files": {name: asdict(p) for name, p in sorted(result.probes.items())}}
    write_atomic(output / PROBES_FILE, lambda p: p.write_text(json.dumps(probes, ensure_ascii=False)))
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
    (output / PLOT_FILE).unlink(missing_ok=True)  # a plot of the manifest being replaced
    if not result.rows:
        (output / MANIFEST_FILE).unlink(missing_ok=True)
        raise UserInputError(
            f"no usable clips in {source}: {len(result.dropped)} file(s) dropped, reasons in {output / REPORT_TEXT}"
        )
    write_atomic(output / MANIFEST_FILE, lambda p: _datasets().Dataset.from_list(result.rows).to_parquet(str(p)))


def load_manifest(folder: str | Path):
    """The manifest of a clip dataset folder as a `datasets.Dataset`."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise UserInputError(f"{folder} is not a clip dataset folder ({MANIFEST_FILE} is missing); run prepare_clips")
    return _datasets().Dataset.from_parquet(str(path))


def _datasets():
    """The `datasets` module, imported late (it takes seconds) and with its progress bars off: "Generating
    train split" for one small local file tells a user nothing."""
    import datasets

    datasets.disable_progress_bars()
    return datasets
