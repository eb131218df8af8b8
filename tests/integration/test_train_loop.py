"""The training loop's parts called in process on the tiny model: a step, its metrics, the checkpoint after
it, a skipped non-finite step and the export (train.py end to end is in test_train.py)."""

from __future__ import annotations

import pytest
import torch

from happyhorse_train.demo.clips import DEMO_CLIPS
from happyhorse_train.errors import RunHalted
from happyhorse_train.training.checkpoint import list_checkpoints
from happyhorse_train.training.config_checks import check_train_config
from happyhorse_train.training.run_log import read_metrics
from happyhorse_train.training.run_setup import set_up_run
from happyhorse_train.training.step import batch_loss
from happyhorse_train.training.trainer import MetricsWindow, after_step, batches, export, log_metrics, optimizer_step
from tests.conftest import train_config
from tests.integration.conftest import FAST, make_dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_model_dir):
    folder = tmp_path_factory.mktemp("loop")
    dataset = make_dataset(folder, DEMO_CLIPS)
    cfg = train_config(
        *FAST, f"model.path={demo_model_dir}", f"data.dataset={dataset}", f"output_dir={folder / 'out'}",
        "trainer.max_steps=3", "trainer.checkpoint_every=2", "data.batch_size=2",
        "trainer.max_consecutive_nonfinite=2",
    )
    check_train_config(cfg)  # as train.py does first (it also makes output_dir)
    return set_up_run(cfg)


def test_a_step_logs_checkpoints_and_exports(run):
    batch, generators = next(batches(run))
    assert len(generators) == batch["latent_mean"].shape[0] == 2 and run.state.batches_in_epoch == 1
    window = MetricsWindow(run.accelerator.device, accumulation=1)
    losses = batch_loss(batch, generators, run.step_context)
    run.accelerator.backward(losses.loss)
    window.add(losses, len(generators))
    before = [p.detach().clone() for p in run.params]
    grad_norm = optimizer_step(run)
    assert grad_norm is not None and torch.isfinite(grad_norm) and run.state.step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, run.params))

    metrics = log_metrics(run, window, grad_norm)
    assert metrics["loss"] == pytest.approx(losses.loss.item()) and metrics["tokens_per_s"] > 0
    assert [row["step"] for row in read_metrics(run.output_dir / "metrics.jsonl")] == [1]

    after_step(run, interrupted=False)  # step 1 of 3, checkpoint_every=2: nothing to write
    assert list_checkpoints(run.output_dir) == []
    after_step(run, interrupted=True)  # a requested stop writes one
    assert [p.name for p in list_checkpoints(run.output_dir)] == ["step-00000001"]

    export(run)
    assert (run.output_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_a_non_finite_gradient_skips_the_step_then_halts_the_run(run):
    step = run.state.step
    for expected_skips in (1, 2):
        run.params[0].grad = torch.full_like(run.params[0], float("nan"))
        if expected_skips < 2:
            assert optimizer_step(run) is None
        else:
            with pytest.raises(RunHalted, match="2 steps in a row had a non-finite loss or gradient"):
                optimizer_step(run)
        assert run.state.step == step and run.state.skipped_steps == expected_skips
        assert all(p.grad is None for p in run.params)  # nothing of the bad gradient is kept
