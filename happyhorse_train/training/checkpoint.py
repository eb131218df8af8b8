"""Resumable checkpoints: everything a run needs to continue exactly where it was.

A checkpoint is a folder `<output_dir>/checkpoints/step-00000250/` holding:
  trainable.safetensors   the trained weights (the LoRA, or the whole transformer)
  optimizer.pt            optimizer state
  deepspeed/              instead of the two above under DeepSpeed: its own checkpoint, each process
                          writing its shard of the weights and optimizer states
  fsdp/                   instead of the two above under FSDP: a torch.distributed.checkpoint of the
                          trainable weights and optimizer states, each process writing its shards
  scheduler.pt            learning-rate schedule state
  ema.pt                  EMA weights (when EMA is on)
  rng-rank<N>.pt          every random-number state of process N (python, numpy, torch, cuda; the training
                          noise is keyed by step and clip, see training/step.py, and needs none)
  trainer_state.json      step, data position (epoch, batches taken), counters, world size

It is written into a hidden `.step-...tmp` folder and renamed when complete, so a folder with a
checkpoint's name is always whole; `latest_checkpoint` never sees a half-written one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from happyhorse_train.errors import RunHalted, UserInputError
from happyhorse_train.training.adapters import trainable_parameters
from happyhorse_train.training.distributed import (
    DeepSpeedZero,
    FullyShardedDataParallel,
    Replicated,
    distributed_strategy,
)

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = output_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to start over a run with checkpoints."""
    existing = list_checkpoints(output_dir)
    if resume is None:
        if existing:
            raise UserInputError(
                f"{output_dir} already holds checkpoints (newest {existing[-1].name}): pass resume=latest to "
                "continue that run, or choose another output_dir"
            )
        return None
    if resume == "latest":
        if not existing:
            raise UserInputError(f"resume=latest but {output_dir / CHECKPOINTS} holds no complete checkpoint")
        return existing[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserInputError(f"resume={resume}: not a checkpoint folder (no trainer_state.json)")
    return path


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    accelerator,
    output_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    lr_schedule,
    ema,
    trainer_state: dict,
    keep: int,
) -> Path:
    """Write a checkpoint from every process (each its RNG, the main one the rest); then prune old ones."""
    final = checkpoint_dir(output_dir, step)
    temporary = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed while writing this step
        temporary.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    failure = None
    try:
        # The engines' collective writes come first: a process that had given up on a write of its own before
        # them would leave the others waiting in their collectives.
        engine = distributed_strategy(accelerator).name
        if engine == DeepSpeedZero.name:  # every process writes its shard; the frozen base is not saved
            model.save_checkpoint(str(temporary / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        elif engine == FullyShardedDataParallel.name:
            dcp.save(_sharded_state(model, optimizer), checkpoint_id=temporary / "fsdp")
        torch.save(rng_state(), temporary / f"rng-rank{accelerator.process_index}.pt")
        if engine == Replicated.name and accelerator.is_main_process:
            trainable = trainable_parameters(accelerator.unwrap_model(model))
            save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(temporary / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
        if accelerator.is_main_process:
            torch.save(lr_schedule.state_dict(), temporary / "scheduler.pt")
            if ema is not None:
                torch.save(ema.state_dict(), temporary / "ema.pt")
            state = {**trainer_state, "step": step, "world_size": accelerator.num_processes}
            (temporary / "trainer_state.json").write_text(json.dumps(state, indent=2))
    except (OSError, RuntimeError, SafetensorError, CheckpointException) as error:  # a failed write, as each says
        failure = error
    # Every process learns whether any write failed, so none waits for another that has given up.
    failed = accelerator.reduce(torch.tensor(float(failure is not None), device=accelerator.device), "max").item() > 0
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        kept = f"the last complete checkpoint, {previous[-1]}, is intact" if previous else "no earlier checkpoint exists"
        reason = f" ({failure})" if failure is not None else " (on another process)"
        raise RunHalted(
            f"could not write the step-{step} checkpoint{reason}: is the disk full? {kept}; free space, then "
            f"continue with resume=latest"
        )
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, model: torch.nn.Module, optimizer, lr_schedule, ema) -> dict:
    """Restore a checkpoint into the live objects; returns its trainer state."""
    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != accelerator.num_processes:
        raise UserInputError(
            f"{path} was written by {state['world_size']} process(es), this run has {accelerator.num_processes}: "
            "resume with the same number of processes (the data order and random states are per process)"
        )
    writer, reader = _engine_of_checkpoint(path), distributed_strategy(accelerator).name
    if writer != reader:
        raise UserInputError(f"{path} was written by {writer}; this run uses {reader}: resume with the same accelerate config")
    if reader == DeepSpeedZero.name:
        model.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False, load_lr_scheduler_states=False)
    elif reader == FullyShardedDataParallel.name:
        shards = _sharded_state(model, optimizer)
        dcp.load(shards, checkpoint_id=path / "fsdp")  # fails on any trainable tensor the checkpoint lacks
        set_state_dict(
            model, optimizer.optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),  # the frozen base is not in it
        )
    else:
        _load_trainable(path, accelerator.unwrap_model(model))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    lr_schedule.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if ema is not None:
        if not (path / "ema.pt").is_file():
            raise UserInputError(f"{path} holds no EMA weights (its run had trainer.ema=false): resume with that")
        ema.load_state_dict(torch.load(path / "ema.pt", weights_only=False))
    restore_rng(torch.load(path / f"rng-rank{accelerator.process_index}.pt", weights_only=False))
    return state


# The frozen base is the model folder's; a checkpoint holds only what trains.
_TRAINABLE_ONLY = StateDictOptions(ignore_frozen_params=True)


def _sharded_state(model: torch.nn.Module, optimizer) -> dict:
    """This process's shards of the trainable weights and optimizer states, keyed by parameter name."""
    weights, optimizer_state = get_state_dict(model, optimizer.optimizer, options=_TRAINABLE_ONLY)
    return {"model": weights, "optimizer": optimizer_state}


def _engine_of_checkpoint(path: Path) -> str:
    """The name of the distributed strategy that wrote the checkpoint at `path`."""
    if (path / "deepspeed").is_dir():
        return DeepSpeedZero.name
    return FullyShardedDataParallel.name if (path / "fsdp").is_dir() else Replicated.name


def _load_trainable(path: Path, model: torch.nn.Module) -> None:
    saved = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    trained_here = {name for name, param in params.items() if param.requires_grad}
    reshaped = sorted(name for name in set(saved) & trained_here if saved[name].shape != params[name].shape)
    problems = [
        (f"{len(names)} {what}", names[:2])
        for what, names in (
            ("trainable weights it lacks", sorted(trained_here - set(saved))),
            ("weights this run does not train", sorted(set(saved) - trained_here)),
            ("weights of another shape", reshaped),
        )
        if names
    ]
    if problems:
        listed = "; ".join(f"{count} (e.g. {', '.join(examples)})" for count, examples in problems)
        raise UserInputError(
            f"{path} does not hold this run's trainable weights: {listed}. Resume with the settings the run "
            "started with (trainer.mode, lora.*)"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
