"""Per-clip loss masks: a sidecar image or video beside a clip (white = train, black = not), pooled into the
latent grid and cached; the loss weights each latent element by it.

`clip.mp4` takes `clip.mask.png` (one mask for every frame) or `clip.mask.mp4` (a mask per frame, the same
frame indices as the clip). Pooling follows the VAE: latent frame 0 is pixel frame 0 alone, latent frame k the
mean of the `temporal` pixel frames it encodes, and each latent pixel the mean of its `spatial` x `spatial` block.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from happyhorse_train.data.clip_rules import clip_frame_indices
from happyhorse_train.data.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, UnreadableMedia, find_sidecar, load_clip

if TYPE_CHECKING:
    import torch

MASK_TAG = ".mask"  # clip.mp4 -> clip.mask.png


def is_mask_file(path: Path) -> bool:
    return path.stem.endswith(MASK_TAG)


def find_mask(media: Path) -> Path | None:
    """The mask sidecar of a media file, if it has one."""
    return find_sidecar(media, MASK_TAG, IMAGE_SUFFIXES | VIDEO_SUFFIXES)


def mask_entry_key(row: dict, video_encoder_id: str) -> str:
    """Key of a clip's latent-space mask: the mask file's content, the clip's window and bucket, the encoder
    (whose VAE decides the latent grid)."""
    parts = (row["mask_fingerprint"], row["start_frame"], row["num_frames"], row["target_fps"],
             row["bucket_height"], row["bucket_width"], video_encoder_id)
    return "m" + hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=16).hexdigest()


def pixel_mask(row: dict) -> torch.Tensor:
    """A manifest row's mask at its bucket size, (frames, height, width) in [0, 1]."""
    path = Path(row["mask"])
    if path.suffix.lower() in IMAGE_SUFFIXES:
        indices = [0]
    else:
        indices = clip_frame_indices(row)
    rgb = load_clip(path, indices, row["bucket_height"], row["bucket_width"])  # (3, T, H, W) in [-1, 1]
    gray = (rgb.mean(0) + 1) / 2
    return gray.expand(row["num_frames"], -1, -1) if len(indices) == 1 else gray


def latent_mask(pixels: torch.Tensor, temporal: int, spatial: int) -> torch.Tensor:
    """(T, H, W) pixel mask -> (1, T', H', W') latent mask, T' = (T - 1) / temporal + 1, H' = H / spatial."""
    import torch  # here: prepare_clips' probing processes import this module and need no torch
    import torch.nn.functional as F

    frames, height, width = pixels.shape
    groups = pixels[1:].reshape((frames - 1) // temporal, temporal, height, width).mean(1)
    pooled = F.avg_pool2d(torch.cat([pixels[:1], groups])[:, None], spatial)[:, 0]
    return pooled[None].contiguous()


def fill_masks(manifest, cache, video_encoder_id: str, temporal: int, spatial: int, rank: int = 0,
               world_size: int = 1, shard_size: int = 64) -> list[dict]:
    """Cache this rank's share of the masks the manifest's clips need; returns the failures (a mask that no
    longer decodes), whose clips the dataset then leaves out rather than train them unmasked."""
    needed = {mask_entry_key(row, video_encoder_id): row for row in manifest if row.get("mask")}
    missing = sorted(key for key in needed if key not in cache)[rank::world_size]
    failed, pending = [], {}
    for key in missing:
        row = needed[key]
        try:
            pending[key] = {"mask": latent_mask(pixel_mask(row), temporal, spatial)}
        except UnreadableMedia as error:
            failed.append({"clip_id": row["clip_id"], "source": row["mask"], "reason": str(error)})
        if len(pending) >= shard_size:
            cache.write_shard(pending)
            pending = {}
    if pending:
        cache.write_shard(pending)
    return failed
