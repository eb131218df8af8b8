"""The latent + text-embedding cache: safetensors shards on disk, found through an index.

Layout of a cache folder:
  shards/b2-<hash>.safetensors  tensors named "<entry key>/<field>" (e.g. "3f2a.../mean"); <hash> is the
                            blake2b checksum of the file's bytes, so `verify` can tell a flipped bit or a
                            truncated file; each shard is written under a temporary name and renamed
                            when complete
  corrupt/                  shards that failed their checksum, moved aside (their entries are re-encoded)
  index.json                {shard file (and so its checksum): [entry keys]}, rebuilt from the shard
                            headers whenever a shard is missing from it: the shards are the truth

Entry keys are content hashes (see `video_entry_key`, `text_entry_key`): a clip is re-encoded only when
its source content, window, bucket or the encoder changed. Shards are only ever added, never rewritten,
so several processes can write at once and a killed run loses at most the shard it was writing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from happyhorse_train.errors import RunHalted
from happyhorse_train.files import file_digest, write_atomic

INDEX_FILE = "index.json"
SHARD_PREFIX = "b2-"


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def video_entry_key(row: dict, video_encoder_id: str) -> str:
    """Key of a clip's latents: source content, window, frame rate, bucket size and the encoder, and the content
    of its first-frame image when it has one (data/first_frames.py: an image-to-video model's condition)."""
    parts = (row["fingerprint"], row["start_frame"], row["num_frames"], row["target_fps"])
    parts += (row["bucket_height"], row["bucket_width"], video_encoder_id)
    if row.get("first_frame_fingerprint"):  # (keys of clips without one are as they were before first frames)
        parts += (row["first_frame_fingerprint"],)
    return "v" + _digest("|".join(map(str, parts)))


def text_entry_key(caption: str, text_encoder_id: str) -> str:
    return "t" + _digest(f"{caption}|{text_encoder_id}")


class NonFiniteTensor(ValueError):
    pass


class LatentCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.shard_dir = self.folder / "shards"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._location: dict[str, str] = {}  # entry key -> shard file name
        self._handles: dict[str, object] = {}
        self.quarantined: list[tuple[str, str]] = []  # (shard, why) moved to corrupt/ by this object
        self.vanished: list[tuple[str, int]] = []  # (shard, entries) listed in index.json but no longer on disk
        self.refresh()

    # --- index --------------------------------------------------------------------------------

    def refresh(self, write_index: bool = False) -> None:
        """Pick up shards written since (by this or another process); optionally rewrite index.json."""
        index_path = self.folder / INDEX_FILE
        try:
            index: dict[str, list[str]] = json.loads(index_path.read_text()) if index_path.is_file() else {}
            torn = False
        except json.JSONDecodeError:  # a torn write: the shards are the truth, so it is rebuilt from them
            index, torn = {}, True
        present = sorted(p.name for p in self.shard_dir.glob("*.safetensors"))
        changed = torn or bool(set(index) - set(present))
        self.vanished += [(name, len(keys)) for name, keys in index.items() if name not in present]
        index = {name: keys for name, keys in index.items() if name in present}
        for name in present:
            if name in index:
                continue
            changed = True
            try:
                with safe_open(self.shard_dir / name, framework="pt") as shard:
                    index[name] = sorted({tensor.split("/", 1)[0] for tensor in shard.keys()})
            except (SafetensorError, OSError) as error:  # e.g. a truncated file: its header is unreadable
                self._quarantine(name, f"unreadable ({error})")
        self._location = {key: name for name, keys in sorted(index.items()) for key in keys}
        if write_index or changed:
            write_atomic(index_path, lambda path: path.write_text(json.dumps(index, indent=0, sort_keys=True)))

    def verify(self) -> list[tuple[str, str]]:
        """Re-hash every shard against the checksum in its name; move the ones that fail to corrupt/ and
        forget their entries (a fill run then re-encodes them). Returns (shard, why) for each moved."""
        before = len(self.quarantined)
        for path in sorted(self.shard_dir.glob("*.safetensors")):
            expected = path.stem.removeprefix(SHARD_PREFIX) if path.stem.startswith(SHARD_PREFIX) else None
            actual = file_digest(path)
            if actual != expected:
                self._quarantine(path.name, f"checksum mismatch: the file hashes to {actual}")
        if len(self.quarantined) > before:
            self.refresh(write_index=True)
        return self.quarantined[before:]

    def check(self, verify: bool) -> list[str]:
        """Re-hash every shard when `verify`; a line for each shard moved aside or gone since the index was
        written, whose entries the next fill encodes again."""
        if verify:
            self.verify()
        lines = [f"cache: {shard} moved to {self.folder / 'corrupt'} ({why}); its entries are encoded again"
                 for shard, why in self.quarantined]
        lines += [f"cache: {shard} ({entries} entries) is gone from {self.shard_dir}; its entries are encoded again"
                  for shard, entries in self.vanished]
        return lines

    def _quarantine(self, name: str, why: str) -> None:
        corrupt = self.folder / "corrupt"
        corrupt.mkdir(exist_ok=True)
        self._handles.pop(name, None)
        try:
            shutil.move(str(self.shard_dir / name), str(corrupt / name))
        except FileNotFoundError:
            return  # another process moved it first
        self.quarantined.append((name, why))

    def keys(self) -> set[str]:
        return set(self._location)

    def __contains__(self, key: str) -> bool:
        return key in self._location

    def __len__(self) -> int:
        return len(self._location)

    # --- reading ------------------------------------------------------------------------------

    def get(self, key: str) -> dict[str, torch.Tensor]:
        shard_name = self._location[key]
        if shard_name not in self._handles:
            self._handles[shard_name] = safe_open(self.shard_dir / shard_name, framework="pt")
        shard = self._handles[shard_name]
        prefix = f"{key}/"
        return {name[len(prefix) :]: shard.get_tensor(name) for name in shard.keys() if name.startswith(prefix)}

    # --- writing ------------------------------------------------------------------------------

    def write_shard(self, entries: dict[str, dict[str, torch.Tensor]]) -> str:
        """Store entries as one new shard; every tensor must be finite. Returns the shard's file name; a failed
        write (a full disk) is a RunHalted saying what is intact."""
        tensors = {}
        for key, fields in entries.items():
            for field, tensor in fields.items():
                if not torch.isfinite(tensor).all():
                    raise NonFiniteTensor(f"cache entry {key} field {field} has non-finite values")
                tensors[f"{key}/{field}"] = tensor.detach().contiguous().cpu()
        data = save(tensors, metadata={"format": "pt"})
        name = f"{SHARD_PREFIX}{hashlib.blake2b(data, digest_size=16).hexdigest()}.safetensors"
        try:
            write_atomic(self.shard_dir / name, lambda path: path.write_bytes(data))
        except OSError as error:
            raise RunHalted(
                f"could not write a cache shard in {self.shard_dir} ({error}): is the disk full? "
                f"Every entry written before is intact; free space and run again to encode the rest"
            ) from error
        for key in entries:
            self._location[key] = name
        return name
