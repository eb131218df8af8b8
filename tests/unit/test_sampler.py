"""BucketBatchSampler: one bucket per batch, determinism, exact mid-epoch resume, even rank sharding."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from happyhorse_train.data.sampler import BucketBatchSampler

REPO = Path(__file__).resolve().parents[2]
SHAPES = [(16, 256, 256), (16, 256, 384), (32, 256, 256)]


def make_buckets(sizes=(11, 7, 5), seed=0):
    """23 items in buckets of 11, 7 and 5, interleaved so a bucket's items are not contiguous indices."""
    buckets = [shape for shape, n in zip(SHAPES, sizes) for _ in range(n)]
    random.Random(seed).shuffle(buckets)
    return buckets


def flat(batches):
    return [i for batch in batches for i in batch]


@pytest.mark.parametrize("batch_size", [2, 3])
def test_drop_last_batches_are_full_single_bucket_and_never_repeat_an_item(batch_size):
    buckets = make_buckets()
    batches = list(BucketBatchSampler(buckets, batch_size))
    assert batches and len(batches) == len(BucketBatchSampler(buckets, batch_size))
    for batch in batches:
        assert len(batch) == batch_size
        assert len({buckets[i] for i in batch}) == 1
    assert len(flat(batches)) == len(set(flat(batches)))
    # 11 // b + 7 // b + 5 // b full batches: the short tail of each bucket is dropped
    assert len(batches) == sum(n // batch_size for n in (11, 7, 5))


@pytest.mark.parametrize("batch_size", [2, 3])
def test_keep_last_yields_every_item_exactly_once(batch_size):
    buckets = make_buckets()
    batches = list(BucketBatchSampler(buckets, batch_size, drop_last=False))
    assert sorted(flat(batches)) == list(range(len(buckets)))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
    assert sum(len(b) < batch_size for b in batches) == sum(n % batch_size != 0 for n in (11, 7, 5))


def test_buckets_interleave_rather_than_run_one_after_another():
    buckets = make_buckets()
    order = [buckets[b[0]] for b in BucketBatchSampler(buckets, 2, seed=1)]
    changes = sum(a != b for a, b in zip(order, order[1:]))
    assert changes > len(SHAPES) - 1, order


def test_same_arguments_give_same_batches_and_epoch_or_seed_change_them():
    buckets = make_buckets()

    def epoch_batches(seed, epoch):
        sampler = BucketBatchSampler(buckets, 2, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(0, 0) == epoch_batches(0, 0)
    assert epoch_batches(0, 1) == epoch_batches(0, 1)
    assert epoch_batches(0, 1) != epoch_batches(0, 0)
    assert epoch_batches(1, 0) != epoch_batches(0, 0)
    assert epoch_batches(2**32, 0) != epoch_batches(0, 0)  # the CPU generator keeps only 32 bits of a seed
    # (seed, epoch) = (0, 1) and (1, 0) must not collapse onto one generator seed
    assert epoch_batches(0, 1) != epoch_batches(1, 0)


def test_order_is_the_same_in_another_process_with_another_hash_seed():
    # String keys hash differently per process; the order must come from the keys, not from hash().
    buckets = [f"bucket-{i % 4}" for i in range(30)]
    code = (
        "import json; from happyhorse_train.data.sampler import BucketBatchSampler as S; "
        f"s = S({buckets!r}, 3, seed=5, rank=1, world_size=2); s.set_epoch(3); print(json.dumps(list(s)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": str(random.randrange(1, 2**31))}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    here = BucketBatchSampler(buckets, 3, seed=5, rank=1, world_size=2)
    here.set_epoch(3)
    assert json.loads(run.stdout) == list(here)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_after_any_number_of_batches_matches_an_uninterrupted_pass(world_size, drop_last):
    buckets = make_buckets()
    args = dict(buckets=buckets, batch_size=2, seed=7, rank=world_size - 1, world_size=world_size, drop_last=drop_last)
    full = list(BucketBatchSampler(**args))
    for k in range(len(full) + 1):  # 0, every middle point, and after the last batch
        first = BucketBatchSampler(**args)
        it = iter(first)
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))
        assert state["batches_yielded"] == k
        resumed = BucketBatchSampler(**args)
        resumed.load_state_dict(state)
        assert head + list(resumed) == full, k


def test_a_completed_epoch_resets_the_count():
    sampler = BucketBatchSampler(make_buckets(), 2)
    full = list(sampler)
    assert sampler.state_dict()["batches_yielded"] == 0
    assert list(sampler) == full


@pytest.mark.parametrize(("batch_size", "drop_last"), [(2, True), (2, False), (3, False)])
def test_two_ranks_get_disjoint_items_and_the_same_number_of_batches(batch_size, drop_last):
    buckets = make_buckets()
    ranks = [list(BucketBatchSampler(buckets, batch_size, 3, r, 2, drop_last)) for r in range(2)]
    global_batches = len(list(BucketBatchSampler(buckets, batch_size, 3, 0, 1, drop_last)))
    assert len(ranks[0]) == len(ranks[1]) == global_batches // 2 > 0
    assert len(BucketBatchSampler(buckets, batch_size, 3, 1, 2, drop_last)) == len(ranks[1])
    items = [set(flat(batches)) for batches in ranks]
    assert not items[0] & items[1]
    assert items[0] | items[1] <= set(range(len(buckets)))
    for batches in ranks:
        assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)


def test_odd_global_batch_count_is_cut_so_ranks_still_match():
    buckets = make_buckets()
    assert len(list(BucketBatchSampler(buckets, 2, drop_last=False))) == 13  # 6 + 4 + 3
    counts = [len(list(BucketBatchSampler(buckets, 2, rank=r, world_size=2, drop_last=False))) for r in range(2)]
    assert counts == [6, 6]


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("batch_size", dict(buckets=make_buckets(), batch_size=3)),
        ("num_items", dict(buckets=make_buckets(sizes=(11, 7, 6)), batch_size=2)),
        ("world_size", dict(buckets=make_buckets(), batch_size=2, world_size=2)),
        ("buckets_sha256", dict(buckets=make_buckets(seed=1), batch_size=2)),
    ],
)
def test_loading_a_state_from_a_different_dataset_or_config_names_the_field(field, other):
    saved = BucketBatchSampler(make_buckets(), 2)
    next(iter(saved))
    changed = BucketBatchSampler(**other)
    differences = changed.differences(saved.state_dict())
    assert differences[0].startswith(f"{field} was ")  # (another item count changes the buckets' hash too)
    with pytest.raises(ValueError, match=rf"^cannot resume sampler: {field} was .*, is .* now") as info:
        changed.load_state_dict(saved.state_dict())
    assert "\n" not in str(info.value)
    assert BucketBatchSampler(make_buckets(), 2).differences(saved.state_dict()) == []


def test_resume_mid_epoch_1_finishes_epoch_1_then_set_epoch_2_gives_the_full_epoch_2():
    buckets = make_buckets()

    def epoch_batches(epoch):
        sampler = BucketBatchSampler(buckets, 2, seed=3)
        sampler.set_epoch(epoch)
        return list(sampler)

    epoch1, epoch2 = epoch_batches(1), epoch_batches(2)
    first = BucketBatchSampler(buckets, 2, seed=3)
    first.set_epoch(0)
    list(first)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it), next(it), next(it)]
    state = json.loads(json.dumps(first.state_dict()))

    resumed = BucketBatchSampler(buckets, 2, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a loop `for e in range(start_epoch, n): set_epoch(e)` re-sets the loaded epoch
    assert head + list(resumed) == epoch1
    resumed.set_epoch(2)
    assert list(resumed) == epoch2


def test_works_as_a_dataloader_batch_sampler():
    buckets = make_buckets()
    sampler = BucketBatchSampler(buckets, 3)
    loader = DataLoader(torch.arange(len(buckets)), batch_sampler=sampler)
    assert len(loader) == len(sampler)
    assert [batch.tolist() for batch in loader] == list(sampler)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(buckets=[], batch_size=2), "buckets is empty"),
        (dict(buckets=[(1, 2, 3)], batch_size=0), "batch_size must be at least 1, got 0"),
        (dict(buckets=[(1, 2, 3)], batch_size=1, world_size=0), "world_size must be at least 1, got 0"),
        (dict(buckets=[(1, 2, 3)], batch_size=1, rank=2, world_size=2), r"rank must be in \[0, 1\].*got 2"),
        (dict(buckets=[(1, 2, 3)], batch_size=1, rank=-1), "got -1"),
    ],
)
def test_invalid_arguments_raise_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BucketBatchSampler(**kwargs)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_unused_clips_counts_exactly_what_the_sampler_leaves_out(world_size):
    from happyhorse_train.data.sampler import unused_clips

    buckets = ["a"] * 7 + ["b"] * 1 + ["c"] * 4 + ["d"] * 3  # 'b' can never fill a batch of 2
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=3, world_size=1)
    expected = unused_clips(buckets, batch_size=2, world_size=world_size)
    assert expected.never == {"b": 1}
    for epoch in range(3):
        seen = []
        for rank in range(world_size):
            ranked = BucketBatchSampler(buckets, batch_size=2, seed=3, rank=rank, world_size=world_size)
            ranked.set_epoch(epoch)
            seen += [i for batch in ranked for i in batch]
        assert len(buckets) - len(seen) == sum(expected.never.values()) + expected.per_epoch
        assert not {i for i, bucket in enumerate(buckets) if bucket == "b"} & set(seen)
    assert len(sampler) * 2 == len(buckets) - 1 - unused_clips(buckets, 2).per_epoch
    line = expected.line(2, world_size)
    assert "1 clip(s) in 1 bucket(s) smaller than a batch are never trained (b: 1;" in line
