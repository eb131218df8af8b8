"""Fill a LatentCache from a clip manifest: encode only what is missing, split across processes."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from happyhorse_train.data.clip_decode import decode_clips
from happyhorse_train.data.clip_rules import clip_frame_indices
from happyhorse_train.data.first_frames import first_frame_pixels
from happyhorse_train.data.latent_cache import LatentCache, NonFiniteTensor, text_entry_key, video_entry_key
from happyhorse_train.data.video import UnreadableMedia, load_clip

FAILURES_FILE = "failures-rank{rank}.json"
_END = object()  # what the decoding thread sends after the last clip


class ClipEncoder(Protocol):
    video_id: str
    text_id: str

    def encode_video(self, pixels: torch.Tensor, first_frame: torch.Tensor | None) -> dict[str, torch.Tensor]: ...

    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]: ...


@dataclass
class CacheRunStats:
    videos_needed: int = 0
    videos_encoded: int = 0
    texts_needed: int = 0
    texts_encoded: int = 0
    failed: list[dict] = field(default_factory=list)  # {"clip_id" or "caption", "source", "reason"}
    seconds: float = 0.0


def required_entries(manifest, encoder: ClipEncoder) -> tuple[dict[str, dict], dict[str, str]]:
    """{video key: a manifest row} and {text key: caption} the manifest needs; "" is always included for
    caption dropout (training with an empty caption)."""
    videos, texts = {}, {text_entry_key("", encoder.text_id): ""}
    for row in manifest:
        videos.setdefault(video_entry_key(row, encoder.video_id), row)
        texts.setdefault(text_entry_key(row["caption"], encoder.text_id), row["caption"])
    return videos, texts


def clip_pixels(row: dict) -> torch.Tensor:
    """A manifest row's frames as the cache encodes them: (3, T, H, W) in [-1, 1] at its bucket size."""
    return load_clip(Path(row["source"]), clip_frame_indices(row), row["bucket_height"], row["bucket_width"])


def prefetch(items: Iterable, depth: int = 1) -> Iterator:
    """`items`, produced by a background thread at most `depth` items ahead (decoding overlaps encoding, and
    memory holds at most depth + 2 items); depth 0: in the calling thread. An exception raised while producing
    is raised here, in its place; closing this generator stops the thread."""
    if depth < 1:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(slot) -> bool:
        while not stop.is_set():  # never blocks for good: the consumer may be gone
            with contextlib.suppress(queue.Full):
                slots.put(slot, timeout=0.1)
                return True
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as error:  # raised again in the consumer
            put((_END, error))
        else:
            put((_END, None))

    thread = threading.Thread(target=produce, name="clip-decode", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def with_first_frames(clips: Iterable) -> Iterator:
    """(key, row, pixels, first-frame image or None) for decode_clips' (key, row, pixels); an image that does not
    decode is its UnreadableMedia, as pixels are."""
    for key, row, pixels in clips:
        try:
            first = first_frame_pixels(row)
        except UnreadableMedia as error:
            first = error
        yield key, row, pixels, first


def _encode_clip(encoder: ClipEncoder, pixels, first_frame) -> dict[str, torch.Tensor]:
    for decoded in (pixels, first_frame):
        if isinstance(decoded, UnreadableMedia):
            raise decoded
    entry = encoder.encode_video(pixels, first_frame)
    bad = [name for name, tensor in entry.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteTensor(f"the VAE gave non-finite {', '.join(bad)}")
    return entry


def fill_cache(
    manifest,
    cache: LatentCache,
    encoder: ClipEncoder,
    rank: int = 0,
    world_size: int = 1,
    shard_size: int = 32,
    text_batch_size: int = 16,
    progress: bool = True,
    decode_ahead: int = 1,
) -> CacheRunStats:
    """Encode this rank's share of the entries missing from the cache and write them as shards.

    Missing keys are sorted and dealt round-robin, so ranks never encode the same entry. The share is decoded
    file by file (`decode_clips`: one reader per file, overlapping windows share their decoded frames), by a
    background thread `decode_ahead` clips ahead of the encoder (0: no thread). A clip that fails to decode or
    encodes to non-finite values is skipped and recorded, and the run goes on.
    """
    started = time.perf_counter()
    videos, texts = required_entries(manifest, encoder)
    stats = CacheRunStats(videos_needed=len(videos), texts_needed=len(texts))
    missing_videos = sorted(k for k in videos if k not in cache)[rank::world_size]
    missing_texts = sorted(k for k in texts if k not in cache)[rank::world_size]

    pending: dict[str, dict[str, torch.Tensor]] = {}

    def flush() -> None:
        if pending:
            cache.write_shard(pending)
            pending.clear()

    bar = tqdm(
        total=len(missing_videos),
        desc=f"encoding clips (rank {rank})",
        unit="clip",
        disable=not (progress and missing_videos),
    )
    clips = with_first_frames(decode_clips((key, videos[key]) for key in missing_videos))
    with contextlib.closing(prefetch(clips, decode_ahead)) as decoded:
        for key, row, pixels, first_frame in decoded:
            try:
                entry = _encode_clip(encoder, pixels, first_frame)
            except (UnreadableMedia, NonFiniteTensor) as error:
                stats.failed.append({"clip_id": row["clip_id"], "source": row["source"], "reason": str(error)})
            else:
                pending[key] = entry
                stats.videos_encoded += 1
                if len(pending) >= shard_size:
                    flush()
            bar.update()
    flush()
    bar.close()

    for start in range(0, len(missing_texts), text_batch_size):
        keys = missing_texts[start : start + text_batch_size]
        for key, entry in zip(keys, encoder.encode_texts([texts[k] for k in keys])):
            if torch.isfinite(entry["text"]).all():
                pending[key] = entry
                stats.texts_encoded += 1
            else:
                stats.failed.append({"caption": texts[key], "reason": "the text encoder gave non-finite states"})
        flush()

    failures_path = cache.folder / FAILURES_FILE.format(rank=rank)
    failures_path.write_text(json.dumps(stats.failed, indent=2, ensure_ascii=False))
    stats.seconds = time.perf_counter() - started
    return stats
