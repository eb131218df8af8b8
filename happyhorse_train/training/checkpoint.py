"""Resumable checkpoints: everything a run needs to continue exactly where it was.

A checkpoint is a folder `<output_dir>/checkpoints/step-00000250/` holding:
  trainable.safetensors   the trained weights (the LoRA, or the whole transformer)
  optimizer.pt            optimizer state
  deepspeed/ or fsdp/     instead of the two above under a sharding engine: its own checkpoint, each
                          process writing its shards (training/distributed.py: `save_engine_state`)
  scheduler.pt            learning-rate schedule state
  ema.pt                  EMA weights (when EMA is on)
  rng-rank<N>.pt          every random-number state of process N (python, numpy, torch, cuda; the training
                          noise is keyed by step and clip, see training/step.py, and needs none)
  trainer_state.json      step, data position (epoch, batches taken), counters, world size, engine

It is written into a hidden `.step-...tmp` folder and renamed when complete, so a folder with a
checkpoint's name is always whole; `latest_checkpoint` never sees a half-written one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

from happyhorse_train.errors import RunHalted, UserInputError
from happyhorse_train.training.distributed import Replicated

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


@dataclass
class Checkpointable:
    """The live objects a checkpoint writes and restores, and the strategy that owns the engine's share."""

    accelerator: object
    strategy: Replicated  # a training/distributed.py strategy
    model: torch.nn.Module  # as accelerate prepared it
    optimizer: object
    lr_schedule: object
    ema: object | None


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


def save_checkpoint(live: Checkpointable, output_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Write a checkpoint from every process (each its RNG, the main one the rest); then prune old ones."""
    accelerator = live.accelerator
    final = checkpoint_dir(output_dir, step)
    temporary = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed while writing this step
        temporary.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    failure = None
    try:
        # The engine's collective writes come first: a process that had given up on a write of its own before
        # them would leave the others waiting in their collectives.
        live.strategy.save_engine_state(accelerator, temporary, live.model, live.optimizer)
        torch.save(rng_state(), temporary / f"rng-rank{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            torch.save(live.lr_schedule.state_dict(), temporary / "scheduler.pt")
            if live.ema is not None:
                torch.save(live.ema.state_dict(), temporary / "ema.pt")
            state = {**trainer_state, "step": step, "world_size": accelerator.num_processes,
                     "engine": live.strategy.name}
            (temporary / "trainer_state.json").write_text(json.dumps(state, indent=2))
    except (OSError, RuntimeError, SafetensorError, CheckpointException) as error:  # a failed write, as each says
        failure = error
    # Every process learns whether any write failed, so none waits for another that has given up.
    failed = accelerator.reduce(torch.tensor(float(failure is not None), device=accelerator.device), "max").item() > 0
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        previous = list_checkpoints(output_dir)
        kept = f"the last complete checkpoint, {previous[-1]}, is intact" if previous else "there is no earlier one"
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


def load_checkpoint(live: Checkpointable, path: Path) -> dict:
    """Restore a checkpoint into the live objects; returns its trainer state."""
    accelerator, strategy = live.accelerator, live.strategy
    state = json.loads((path / "trainer_state.json").read_text())
    if state["world_size"] != accelerator.num_processes:
        raise UserInputError(
            f"{path} was written by {state['world_size']} process(es), this run has {accelerator.num_processes}: "
            "resume with the same number of processes (the data order and random states are per process)"
        )
    writer = state.get("engine", strategy.name)  # (checkpoints before 2026-12-03 did not record it)
    if writer != strategy.name:
        raise UserInputError(
            f"{path} was written under {writer}, this run is {strategy.name} ({strategy.engine.label}): resume "
            "with the accelerate config the run started with"
        )
    strategy.load_engine_state(accelerator, path, live.model, live.optimizer)
    live.lr_schedule.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if live.ema is not None:
        if not (path / "ema.pt").is_file():
            raise UserInputError(f"{path} holds no EMA weights (its run had trainer.ema=false): resume with that")
        live.ema.load_state_dict(torch.load(path / "ema.pt", weights_only=False))
    restore_rng(torch.load(path / f"rng-rank{accelerator.process_index}.pt", weights_only=False))
    return state
