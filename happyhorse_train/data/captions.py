"""Where a clip's caption comes from: a sidecar `<name>.txt`, else `captions.jsonl` / `captions.csv` in the folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path


class CaptionError(Exception):
    """A caption source exists but cannot be read; the message is the drop reason."""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()  # -sig: a byte-order mark is not caption text
    except UnicodeDecodeError as error:
        raise CaptionError(
            f"caption file {path.name} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from error
    except OSError as error:
        raise CaptionError(f"caption file {path.name} cannot be read ({error.strerror})") from error


class CaptionIndex:
    """Captions for the media files under `root`.

    Mapping files name media by path relative to `root` (or by bare file name); the keys are
    `file`/`caption` in captions.jsonl and the header `file,caption` in captions.csv.
    """

    def __init__(self, root: Path):
        self.root = root
        self.mapping: dict[str, str] = {}
        self.problems: list[tuple[str, str]] = []  # (mapping file, reason) for the report
        self._load_jsonl(root / "captions.jsonl")
        self._load_csv(root / "captions.csv")

    def _add(self, name: str, caption: str) -> None:
        self.mapping[name.replace("\\", "/")] = caption.strip()

    def _load_jsonl(self, path: Path) -> None:
        if not path.is_file():
            return
        try:
            lines = _read_text(path).splitlines()
        except CaptionError as error:
            self.problems.append((path.name, str(error)))
            return
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self._add(str(row["file"]), str(row["caption"]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                self.problems.append((path.name, f"line {number} skipped: needs {{\"file\", \"caption\"}} ({error})"))

    def _load_csv(self, path: Path) -> None:
        if not path.is_file():
            return
        try:
            rows = list(csv.DictReader(_read_text(path).splitlines()))
        except CaptionError as error:
            self.problems.append((path.name, str(error)))
            return
        for number, row in enumerate(rows, 2):
            if row.get("file") is None or row.get("caption") is None:
                self.problems.append((path.name, f"line {number} skipped: needs the columns file,caption"))
                continue
            self._add(row["file"], row["caption"])

    def caption_for(self, media: Path) -> str | None:
        """The caption, None when there is none (an empty or blank one is none too); raises CaptionError when the
        sidecar is unreadable."""
        sidecar = media.with_suffix(".txt")
        if sidecar.is_file():
            return _read_text(sidecar) or None
        relative = media.relative_to(self.root).as_posix()
        return self.mapping.get(relative, self.mapping.get(media.name)) or None
