"""Batches of same-shape items: deterministic, resumable mid-epoch, and sharded evenly across ranks."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from happyhorse_train.errors import UserInputError

# Fields that must match between a checkpointed state and this sampler; any difference changes the batch list.
_MUST_MATCH = ("num_items", "batch_size", "world_size", "drop_last", "buckets_sha256")


def batches_per_epoch(bucket_sizes: Sequence[int], batch_size: int, world_size: int, drop_last: bool) -> int:
    """Batches each rank takes per epoch: whole batches per bucket (or with their short tails), the global
    count cut to a multiple of the world size."""
    per_bucket = [n // batch_size if drop_last else -(-n // batch_size) for n in bucket_sizes]
    return sum(per_bucket) // world_size


@dataclass(frozen=True)
class UnusedClips:
    never: dict[str, int]  # bucket -> clips, for buckets too small to make one batch: never trained
    per_epoch: int  # clips of the other buckets each epoch leaves out (bucket remainders; different ones each time)

    def line(self, batch_size: int, world_size: int = 1, fix: str = "lower the batch size") -> str | None:
        """One sentence for people, or None when every clip is trained every epoch."""
        parts = []
        if self.never:
            shown = ", ".join(f"{bucket}: {n}" for bucket, n in sorted(self.never.items())[:5])
            more = f", and {len(self.never) - 5} more" if len(self.never) > 5 else ""
            parts.append(
                f"{sum(self.never.values())} clip(s) in {len(self.never)} bucket(s) smaller than a batch are never "
                f"trained ({shown}{more}; a batch takes clips of one bucket): {fix}, or add clips of those shapes"
            )
        if self.per_epoch:
            parts.append(f"{self.per_epoch} clip(s) per epoch are left out as bucket remainders (others each epoch)")
        if not parts:
            return None
        return f"at batch size {batch_size} on {world_size} process(es): " + "; ".join(parts)


def unused_clips(buckets: Sequence[Hashable] | Mapping[Hashable, int], batch_size: int,
                 world_size: int = 1) -> UnusedClips:
    """Which clips a `BucketBatchSampler` (drop_last, as training uses it) leaves out: given each clip's bucket,
    or the clip count per bucket."""
    counts = Counter(dict(buckets)) if isinstance(buckets, Mapping) else Counter(buckets)
    used = batches_per_epoch(list(counts.values()), batch_size, world_size, drop_last=True) * world_size
    never = {str(bucket): n for bucket, n in counts.items() if n < batch_size}
    return UnusedClips(never, sum(counts.values()) - sum(never.values()) - used * batch_size)


class BucketBatchSampler(Sampler[list[int]]):
    """Yield lists of dataset indices in which every index has the same bucket (e.g. `(frames, height, width)`).

    Guarantees:
    - One bucket per batch. With `drop_last` every batch has `batch_size` items (each bucket's short tail is
      dropped); without it the tails are kept as smaller batches, so every item appears once per epoch.
    - The order is a function of (buckets, batch_size, seed, epoch, drop_last, world_size, rank) only: any
      process gets the same batches. Bucket keys are ordered by `repr`, so keys need a stable repr (tuples of
      ints, strings); `hash` is salted per process and must not decide the order.
    - Ranks get disjoint batches and the same number of them (`len(self)`); the global batch list is cut to a
      multiple of `world_size`, since a rank with one extra step would hang the others in a collective.
    - Resumable: `state_dict()` records the epoch and how many batches this epoch has yielded, and after
      `load_state_dict` the next iteration continues with the next batch. All ranks yield the same count, so
      one rank's state resumes every rank.

    Use it like `DistributedSampler`: call `set_epoch(e)` before each epoch, and pass it to a `DataLoader` as
    `batch_sampler`. The count is of batches handed out, and a `DataLoader` with workers draws a few batches
    ahead of the training step; to resume exactly there, store the number of steps the loop actually took in
    the epoch as `batches_yielded`.
    """

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if len(buckets) == 0:
            raise ValueError("buckets is empty: the dataset has no items to sample")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size - 1}] for world_size {world_size}, got {rank}")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.num_items = len(buckets)
        self.epoch = 0
        self._batches_yielded = 0

        groups: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(buckets):
            groups.setdefault(bucket, []).append(index)
        self._groups = [torch.tensor(groups[key]) for key in sorted(groups, key=repr)]

        # Detects a dataset that kept its length but changed items or buckets since a checkpoint.
        digest = hashlib.sha256()
        for bucket in buckets:
            digest.update(repr(bucket).encode() + b"\0")
        self._buckets_sha256 = digest.hexdigest()[:16]

        self._len = batches_per_epoch([len(g) for g in self._groups], batch_size, world_size, drop_last)

    def set_epoch(self, epoch: int) -> None:
        # Only a new epoch restarts at batch 0: a loop that resumes and then calls set_epoch(same epoch), as
        # `for e in range(start, n): sampler.set_epoch(e)` does, must keep the resumed position.
        if epoch != self.epoch:
            self._batches_yielded = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def _rank_batches(self) -> list[list[int]]:
        # Hash (seed, epoch) rather than add them, so (0, 1) and (1, 0) differ; 32 bits because the CPU
        # generator ignores the rest of its seed.
        mixed = hashlib.sha256(f"{self.seed},{self.epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(mixed[:4], "little"))
        batches: list[list[int]] = []
        for group in self._groups:
            shuffled = group[torch.randperm(len(group), generator=generator)].tolist()
            end = len(shuffled) - len(shuffled) % self.batch_size if self.drop_last else len(shuffled)
            batches += [shuffled[i : i + self.batch_size] for i in range(0, end, self.batch_size)]
        order = torch.randperm(len(batches), generator=generator)[: self._len * self.world_size].tolist()
        return [batches[i] for i in order[self.rank :: self.world_size]]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        # Start after the batches a resumed checkpoint already consumed; count before yielding so a state taken
        # while the consumer holds batch i says i + 1 were handed out.
        for i in range(self._batches_yielded, len(batches)):
            self._batches_yielded = i + 1
            yield batches[i]
        self._batches_yielded = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches_yielded": self._batches_yielded,
            "seed": self.seed,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "drop_last": int(self.drop_last),
            "buckets_sha256": self._buckets_sha256,
        }

    def differences(self, state: dict) -> list[str]:
        """How a saved `state_dict()` differs from this sampler in what decides the batch list (none: a
        resume can continue where that state was)."""
        ours = self.state_dict()
        return [
            f"{key} was {state.get(key)!r}, is {ours[key]!r} now" for key in _MUST_MATCH if state.get(key) != ours[key]
        ]

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ValueError(f"sampler state lacks {', '.join(missing)}: not a BucketBatchSampler state_dict")
        changes = self.differences(state)
        if changes:
            raise UserInputError(
                f"cannot resume sampler: {'; '.join(changes)} (the dataset or the data config changed since the "
                "checkpoint)"
            )
        if not 0 <= state["batches_yielded"] <= self._len:
            raise ValueError(f"sampler state has batches_yielded {state['batches_yielded']}, outside [0, {self._len}]")
        # The seed comes from the checkpoint so the resumed epoch continues the order it started with.
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self._batches_yielded = state["batches_yielded"]
