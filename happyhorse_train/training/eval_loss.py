"""The eval loss: the plain flow-matching loss of fixed clips at fixed noise levels with fixed noise.

The training loss draws a new sigma and new noise every step (and may be weighted by sigma), so it jumps
around however well the model does. This one evaluates the same (clip, sigma, noise) items every time, so it
moves only when the weights do; it is the same after a resume and at any process count (each item's noise is
keyed by the item, not by where it runs). Held-out clips are split off by source video, so the windows of one
video are never on both sides.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from happyhorse_train.data.dataset import CachedClipDataset, collate_clips
from happyhorse_train.training.step import StepContext, keyed_generator, velocity_errors


def held_out_fingerprints(fingerprints: list[str], share: float) -> set[str]:
    """The source videos (by content fingerprint) kept out of training: the first floor(share * videos) in the
    order of a hash of the fingerprint, so the split does not depend on file names, order or seed."""
    distinct = sorted(set(fingerprints), key=_hash)
    return set(distinct[: math.floor(share * len(distinct))])


@dataclass(frozen=True)
class EvalChunk:
    """One forward: a clip of one group at several of the eval sigmas."""

    group: str  # "held_out" or "train"
    dataset: CachedClipDataset
    index: int
    sigma_indices: tuple[int, ...]


class EvalSet:
    """The fixed items: each chosen clip of each group at every eval sigma, in forwards of `batch_size` items."""

    def __init__(self, groups: dict[str, tuple[CachedClipDataset, list[int]]], sigmas, batch_size: int, seed: int):
        self.sigmas, self.seed = [float(s) for s in sigmas], seed
        self.groups = [name for name, (_, indices) in groups.items() if indices]
        sigma_indices = list(range(len(self.sigmas)))
        self.chunks = [
            EvalChunk(name, dataset, index, tuple(sigma_indices[start : start + batch_size]))
            for name, (dataset, indices) in groups.items()
            for index in indices
            for start in range(0, len(sigma_indices), batch_size)
        ]

    def describe(self) -> str:
        clips = {name: len({c.index for c in self.chunks if c.group == name}) for name in self.groups}
        listed = ", ".join(f"{count} {name.replace('_', '-')} clip(s)" for name, count in clips.items())
        return f"{listed} at sigmas {', '.join(f'{s:g}' for s in self.sigmas)}"

    def chunks_of(self, rank: int, world: int) -> list[tuple[EvalChunk, bool]]:
        """(chunk, counted) for one process. Every process gets the same number of forwards (a sharded engine's
        forward is a collective), so the short ones repeat a chunk that is not counted."""
        mine = [(chunk, True) for chunk in self.chunks[rank::world]]
        return mine + [(self.chunks[0], False)] * (math.ceil(len(self.chunks) / world) - len(mine))


def build_eval_set(cfg, train: CachedClipDataset, held_out: CachedClipDataset | None) -> EvalSet | None:
    """The eval items of a run: up to `eval.held_out_clips` never-trained clips and `eval.train_clips` training
    clips, each chosen by a hash of its clip id (the same clips every run)."""
    if not cfg.eval.every:
        return None

    def pick(dataset, count):
        if dataset is None or count <= 0:
            return []
        ranked = sorted(range(len(dataset)), key=lambda i: _hash(dataset.rows[i]["clip_id"]))
        return sorted(ranked[:count])

    groups = {"held_out": (held_out, pick(held_out, cfg.eval.held_out_clips)),
              "train": (train, pick(train, cfg.eval.train_clips))}
    eval_set = EvalSet(groups, cfg.eval.sigmas, cfg.data.batch_size, cfg.seed)
    return eval_set if eval_set.chunks else None


def _hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def chunk_errors(chunk: EvalChunk, eval_set: EvalSet, ctx: StepContext) -> torch.Tensor:
    """The squared velocity error of each item of `chunk`, shape (items,). The latent is the cached mean and
    the caption the clip's own: only the noise is drawn, from a generator keyed by the item."""
    item = chunk.dataset[chunk.index]
    batch = collate_clips([item] * len(chunk.sigma_indices))
    shape = item["latent_mean"].shape
    noise = torch.stack([
        torch.randn(shape, generator=keyed_generator("eval", eval_set.seed, chunk.group, item["clip_id"], s))
        for s in chunk.sigma_indices
    ])
    sigmas = torch.tensor([eval_set.sigmas[s] for s in chunk.sigma_indices])
    text = (batch["text_states"], batch["text_mask"])
    errors, _, _ = velocity_errors(batch, torch.zeros_like(noise), sigmas, noise, text, ctx, shifted=False)
    return errors


def eval_losses(eval_set: EvalSet, ctx: StepContext, accelerator) -> dict[str, float]:
    """eval_loss over every item, and eval_loss_<group> per group, as means over all processes' items."""
    sums = torch.zeros(len(eval_set.groups), device=accelerator.device)
    counts = torch.zeros_like(sums)
    ctx.model.eval()  # no LoRA dropout
    with torch.no_grad():
        for chunk, counted in eval_set.chunks_of(accelerator.process_index, accelerator.num_processes):
            errors = chunk_errors(chunk, eval_set, ctx)
            if counted:
                group = eval_set.groups.index(chunk.group)
                sums[group] += errors.sum()
                counts[group] += len(errors)
    ctx.model.train()
    sums, counts = accelerator.reduce(sums, "sum"), accelerator.reduce(counts, "sum")
    metrics = {"eval_loss": (sums.sum() / counts.sum()).item()}
    for group, (total, count) in zip(eval_set.groups, zip(sums.tolist(), counts.tolist())):
        metrics[f"eval_loss_{group}"] = total / count
    return metrics
