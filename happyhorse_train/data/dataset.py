"""The training dataset: clips of a manifest served from the latent cache, and batch collation."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from happyhorse_train.data.latent_cache import LatentCache, text_entry_key, video_entry_key
from happyhorse_train.data.loss_masks import mask_entry_key


class CachedClipDataset(Dataset):
    """Items: {"latent_mean", "latent_std": (C, T', H', W'), "text_states": (tokens, dim), "clip_id", "bucket",
    "condition": the other fields the clip encoder stored with the latents (an image-to-video model's image
    latents and embeddings; none for text to video)}, and "loss_mask": (1, T', H', W') for a clip with one
    (data/loss_masks.py).

    Only clips whose latents, caption and mask (if it has one) are all cached are served; `missing` lists the
    clip ids left out, so the trainer can say how many (a clip that failed to decode, or a cache not yet filled).
    """

    def __init__(self, manifest, cache: LatentCache, video_encoder_id: str, text_encoder_id: str):
        self.cache = cache
        self.rows, self.missing = [], []
        for row in manifest:
            video_key = video_entry_key(row, video_encoder_id)
            text_key = text_entry_key(row["caption"], text_encoder_id)
            mask_key = mask_entry_key(row, video_encoder_id) if row.get("mask") else None
            if video_key in cache and text_key in cache and (mask_key is None or mask_key in cache):
                self.rows.append({**row, "video_key": video_key, "text_key": text_key, "mask_key": mask_key})
            else:
                self.missing.append(row["clip_id"])
        self.empty_text_key = text_entry_key("", text_encoder_id)

    @property
    def buckets(self) -> list[str]:
        """Each item's shape key, for BucketBatchSampler: one shape per batch."""
        return [row["bucket"] for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        latents = self.cache.get(row["video_key"])
        item = {
            "latent_mean": latents.pop("mean"),
            "latent_std": latents.pop("std"),
            "text_states": self.cache.get(row["text_key"])["text"],
            "clip_id": row["clip_id"],
            "bucket": row["bucket"],
            "condition": latents,
        }
        if row["mask_key"]:
            item["loss_mask"] = self.cache.get(row["mask_key"])["mask"]
        return item


def collate_clips(items: list[dict]) -> dict:
    """Stack latents and conditioning (one shape per batch) and right-pad text states, with a mask of real
    tokens; with a loss mask when any clip has one (all ones for the clips without)."""
    text, mask = pad_text_states([item["text_states"] for item in items])
    batch = {
        "latent_mean": torch.stack([item["latent_mean"] for item in items]),
        "latent_std": torch.stack([item["latent_std"] for item in items]),
        "text_states": text,
        "text_mask": mask,
        "clip_ids": [item["clip_id"] for item in items],
        "condition": {name: torch.stack([item["condition"][name] for item in items]) for name in items[0]["condition"]},
    }
    if any("loss_mask" in item for item in items):
        ones = torch.ones_like(items[0]["latent_mean"][:1])
        batch["loss_mask"] = torch.stack([item.get("loss_mask", ones).to(ones) for item in items])
    return batch


def pad_text_states(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens_i, dim) text states -> (batch, longest, dim) right-padded with zeros, and a bool mask of real tokens."""
    longest = max(row.shape[0] for row in rows)
    text = torch.zeros(len(rows), longest, rows[0].shape[1], dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, row in enumerate(rows):
        text[i, : row.shape[0]], mask[i, : row.shape[0]] = row, True
    return text, mask
