"""A short identity for a saved model component, so caches can tell when the component changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

_EDGE = 1 << 20  # bytes read from each end of a weight file


def component_id(folder: str | Path) -> str:
    """Hash of a component folder's config files and of each weight file's name, size, first and last MiB.

    Reading whole weight files (11 GB for a UMT5-XXL encoder) would cost more than some caching runs;
    size plus both ends changes with any re-save of different weights in practice.
    """
    digest = hashlib.blake2b(digest_size=12)
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        digest.update(path.relative_to(folder).as_posix().encode())
        if path.suffix in (".json", ".txt", ".model"):
            digest.update(path.read_bytes())
        else:
            size = path.stat().st_size
            digest.update(str(size).encode())
            with path.open("rb") as handle:
                digest.update(handle.read(_EDGE))
                handle.seek(max(0, size - _EDGE))
                digest.update(handle.read(_EDGE))
    return digest.hexdigest()
