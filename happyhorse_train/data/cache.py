"""The latent + text-embedding cache: safetensors shards on disk, found through an index.

Layout of a cache folder:
  shards/<id>.safetensors   tensors named "<entry key>/<field>" (e.g. "3f2a.../mean"); each shard is
                            written under a temporary name and renamed when complete, so a shard file
                            that exists is whole
  index.json                {shard file: [entry keys]}, rebuilt from the shard headers whenever a shard
                            is missing from it: the shards are the truth, the index only saves reading
                            every header

Entry keys are content hashes (see `video_entry_key`, `text_entry_key`): a clip is re-encoded only when
its source content, window, bucket or the encoder changed. Shards are only ever added, never rewritten,
so several processes can write at once and a killed run loses at most the shard it was writing.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from happyhorse_train.files import write_atomic

INDEX_FILE = "index.json"


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def video_entry_key(row: dict, video_encoder_id: str) -> str:
    """Key of a clip's latents: source content, window, frame rate, bucket size and the encoder."""
    parts = (row["fingerprint"], row["start_frame"], row["num_frames"], row["target_fps"])
    return "v" + _digest("|".join(map(str, (*parts, row["bucket_height"], row["bucket_width"], video_encoder_id))))


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
        self.refresh()

    # --- index --------------------------------------------------------------------------------

    def refresh(self, write_index: bool = False) -> None:
        """Pick up shards written since (by this or another process); optionally rewrite index.json."""
        index_path = self.folder / INDEX_FILE
        index: dict[str, list[str]] = json.loads(index_path.read_text()) if index_path.is_file() else {}
        present = sorted(p.name for p in self.shard_dir.glob("*.safetensors"))
        stale = set(index) - set(present)
        for name in present:
            if name not in index:
                with safe_open(self.shard_dir / name, framework="pt") as shard:
                    index[name] = sorted({tensor.split("/", 1)[0] for tensor in shard.keys()})
        for name in stale:
            del index[name]
        self._location = {key: name for name, keys in sorted(index.items()) for key in keys}
        if write_index or stale or len(index) != len(present):
            write_atomic(index_path, lambda path: path.write_text(json.dumps(index, indent=0, sort_keys=True)))

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
        """Store entries as one new shard; every tensor must be finite. Returns the shard's file name."""
        tensors = {}
        for key, fields in entries.items():
            for field, tensor in fields.items():
                if not torch.isfinite(tensor).all():
                    raise NonFiniteTensor(f"cache entry {key} field {field} has non-finite values")
                tensors[f"{key}/{field}"] = tensor.detach().contiguous().cpu()
        name = f"{uuid.uuid4().hex}.safetensors"
        write_atomic(self.shard_dir / name, lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
        for key in entries:
            self._location[key] = name
        return name
