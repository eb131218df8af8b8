"""Checkpoints in one process: a round trip, and a resume whose config changed says what differs."""

from __future__ import annotations

import re

import pytest
import torch
from accelerate import Accelerator

from happyhorse_train.errors import UserInputError
from happyhorse_train.training.checkpoint import Checkpointable, load_checkpoint, save_checkpoint
from happyhorse_train.training.distributed import Replicated
from happyhorse_train.training.ema import EMA


def model_training(names: tuple[str, ...], width: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, 4))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return model


def saved_run(folder, names=("0.weight",)) -> tuple:
    accelerator = Accelerator(cpu=True)
    model = model_training(names)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    live = Checkpointable(accelerator, Replicated(), model, optimizer, schedule, None)
    path = save_checkpoint(live, folder, 3, {"epoch": 0}, keep=2)
    return accelerator, model, path


def resume_into(accelerator, path, model, ema=None) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return load_checkpoint(Checkpointable(accelerator, Replicated(), model, optimizer, schedule, ema), path)


def test_a_checkpoint_restores_the_trained_weights(tmp_path):
    accelerator, trained, path = saved_run(tmp_path)
    fresh = model_training(("0.weight",))
    state = resume_into(accelerator, path, fresh)
    assert state["step"] == 3 and state["epoch"] == 0
    untrained = model_training(())
    assert torch.equal(fresh[0].weight, trained[0].weight) and not torch.equal(fresh[0].weight, untrained[0].weight)


@pytest.mark.parametrize(
    "names, width, message",
    [
        (("0.weight", "0.bias"), 4, "1 trainable weights it lacks (e.g. 0.bias)"),
        (("0.bias",), 4, "1 weights this run does not train (e.g. 0.weight)"),
        (("0.weight",), 8, "1 weights of another shape (e.g. 0.weight)"),
    ],
)
def test_resuming_with_other_trainable_weights_names_them(tmp_path, names, width, message):
    accelerator, _, path = saved_run(tmp_path)
    expected = r"does not hold this run's trainable weights: .*" + re.escape(message)
    with pytest.raises(UserInputError, match=expected) as error:
        resume_into(accelerator, path, model_training(names, width))
    assert "Resume with the settings the run started with" in str(error.value)


def test_resuming_with_ema_from_a_run_without_it_says_so(tmp_path):
    accelerator, _, path = saved_run(tmp_path)
    model = model_training(("0.weight",))
    ema = EMA([model[0].weight], 0.99)
    with pytest.raises(UserInputError, match=r"holds no EMA weights \(its run had trainer.ema=false\)"):
        resume_into(accelerator, path, model, ema)
