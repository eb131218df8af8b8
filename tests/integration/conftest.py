"""Shared integration fixtures: demo-clip datasets prepared once per test module, and the helper that makes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from happyhorse_train.data.clip_rules import Bucket, ClipRules
from happyhorse_train.data.prepare import prepare_clips, write_dataset_folder
from happyhorse_train.demo.clips import DEMO_CLIPS, write_demo_clips

RULES = ClipRules(buckets=[Bucket(9, 32, 48), Bucket(9, 48, 32)], min_frames=9)
# Fast settings every train.py run shares: float32 on the CPU, no tracker, no validation unless asked.
FAST = ["trainer.mixed_precision=no", "logging.logger=none", "validation.every=0", "data.max_sequence_length=32"]


def make_dataset(folder: Path, recipes) -> Path:
    write_demo_clips(folder / "clips", recipes)
    result = prepare_clips(folder / "clips", RULES, num_workers=1, progress=False)
    write_dataset_folder(result, folder / "clips", folder / "dataset", RULES)
    return folder / "dataset"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("train_data"), DEMO_CLIPS)


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("one_clip"), DEMO_CLIPS[:1])
