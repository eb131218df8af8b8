"""The eval loss in process on the tiny model: which clips it holds out and evaluates, that it is fixed while the
weights are, and that it moves when they do (its equality across a resume is in test_reliability.py, across
process counts and engines in test_scale_out.py)."""

from __future__ import annotations

import pytest

from happyhorse_train.demo.clips import DEMO_CLIPS
from happyhorse_train.training.config_checks import check_train_config
from happyhorse_train.training.eval_loss import eval_losses
from happyhorse_train.training.run_setup import set_up_run
from happyhorse_train.training.step import batch_loss
from happyhorse_train.training.trainer import batches, optimizer_step
from tests.conftest import train_config
from tests.integration.conftest import FAST, make_dataset


def set_up(model, dataset, out, *overrides):
    cfg = train_config(*FAST, f"model.path={model}", f"data.dataset={dataset}", f"output_dir={out}",
                       "trainer.max_steps=3", "data.batch_size=1", *overrides)
    check_train_config(cfg)
    return set_up_run(cfg)


@pytest.fixture(scope="module")
def six_videos(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("eval"), DEMO_CLIPS)


def test_held_out_videos_are_not_trained_on_and_the_eval_is_fixed_until_a_step(six_videos, demo_model_dir, tmp_path):
    # 6 source videos of one clip each, a third held out: 2 videos; 1 of them evaluated, and 2 training clips.
    run = set_up(demo_model_dir, six_videos, tmp_path, "eval.held_out=0.34", "eval.held_out_clips=1",
                 "eval.train_clips=2")
    held_out = run.eval_set.chunks[0].dataset
    assert len(held_out) == 2 and len(run.dataset) == 4
    assert not {row["fingerprint"] for row in held_out.rows} & {row["fingerprint"] for row in run.dataset.rows}
    assert run.eval_set.groups == ["held_out", "train"]
    assert len(run.eval_set.chunks) == (1 + 2) * 5  # one forward per clip and sigma at batch size 1

    before = eval_losses(run.eval_set, run.step_context, run.accelerator)
    assert set(before) == {"eval_loss", "eval_loss_held_out", "eval_loss_train"}
    assert eval_losses(run.eval_set, run.step_context, run.accelerator) == before  # same noise, same weights
    assert run.model.training  # back in training mode

    batch, generators = next(batches(run))
    run.accelerator.backward(batch_loss(batch, generators, run.step_context).loss)
    assert optimizer_step(run) is not None
    after = eval_losses(run.eval_set, run.step_context, run.accelerator)
    assert all(after[key] != before[key] for key in before)


def test_an_eval_dataset_is_evaluated_instead_and_nothing_is_held_out(six_videos, demo_model_dir, tmp_path):
    other = make_dataset(tmp_path / "other", DEMO_CLIPS[:1])
    run = set_up(demo_model_dir, six_videos, tmp_path / "out", f"eval.dataset={other}", "eval.held_out=0.34",
                 "eval.train_clips=0", "eval.sigmas=[0.5]")
    assert len(run.dataset) == 6  # every clip of data.dataset trains
    assert run.eval_set.groups == ["held_out"] and len(run.eval_set.chunks) == 1
    assert all(row["source"].startswith(str(tmp_path / "other")) for row in run.eval_set.chunks[0].dataset.rows)
    assert set(eval_losses(run.eval_set, run.step_context, run.accelerator)) == {"eval_loss", "eval_loss_held_out"}
