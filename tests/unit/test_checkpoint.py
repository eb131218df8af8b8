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


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_bytes(path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {  # what a kill, a full disk or a bad sector leaves, and the reason a resume gives for it
    "truncated weights": (lambda c: truncate(c / "trainable.safetensors"), "trainable.safetensors has"),
    "flipped weight bytes": (lambda c: flip_bytes(c / "trainable.safetensors"), "does not match its checksum"),
    "zeroed optimizer": (lambda c: (c / "optimizer.pt").write_bytes(b""), "optimizer.pt has 0 bytes"),
    "zeroed schedule": (lambda c: (c / "scheduler.pt").write_bytes(b""), "scheduler.pt has 0 bytes"),
    "flipped optimizer bytes": (lambda c: flip_bytes(c / "optimizer.pt", 8), "optimizer.pt does not match"),
    "truncated state": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json has"),
    "deleted rng": (lambda c: (c / "rng-rank0.pt").unlink(), "rng-rank0.pt is missing"),
    "no manifest": (lambda c: (c / "manifest.json").unlink(), "no manifest.json"),
    "torn manifest": (lambda c: truncate(c / "manifest.json"), "manifest.json is unreadable"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_each_kind_of_damage_is_found_and_latest_falls_back_to_the_intact_one(kind, tmp_path):
    from happyhorse_train.training.checkpoint import checkpoint_damage, checkpoint_dir, resolve_resume

    accelerator, model, older = saved_run(tmp_path)
    live = Checkpointable(accelerator, Replicated(), model, *resume_parts(model))
    newer = save_checkpoint(live, tmp_path, 5, {"epoch": 0}, keep=2)
    assert checkpoint_damage(older) is None and checkpoint_damage(newer) is None
    damage, reason = DAMAGE[kind]
    damage(newer)
    assert reason in checkpoint_damage(newer)
    said = []
    assert resolve_resume(tmp_path, "latest", said.append) == older == checkpoint_dir(tmp_path, 3)
    assert len(said) == 1 and str(newer) in said[0] and reason in said[0]
    with pytest.raises(UserInputError, match=f"resume={re.escape(str(newer))}: the checkpoint is damaged"):
        resolve_resume(tmp_path, str(newer), said.append)
    damage(older)
    with pytest.raises(UserInputError, match="every checkpoint in .* is damaged"):
        resolve_resume(tmp_path, "latest", said.append)


def resume_parts(model) -> tuple:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), None


def test_pruning_renames_before_deleting_so_no_partial_checkpoint_is_listed(tmp_path):
    from happyhorse_train.training.checkpoint import checkpoint_dir, list_checkpoints

    accelerator, model, _ = saved_run(tmp_path)
    live = Checkpointable(accelerator, Replicated(), model, *resume_parts(model))
    # What a kill during an earlier prune leaves: a half-deleted folder under the hidden name.
    half_deleted = tmp_path / "checkpoints" / ".step-00000001.deleting"
    half_deleted.mkdir()
    (half_deleted / "optimizer.pt").write_bytes(b"x")
    for step in (5, 7):
        save_checkpoint(live, tmp_path, step, {"epoch": 0}, keep=2)
    assert list_checkpoints(tmp_path) == [checkpoint_dir(tmp_path, 5), checkpoint_dir(tmp_path, 7)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000005", "step-00000007"]
