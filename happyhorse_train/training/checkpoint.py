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

  manifest.json           every other file's size and blake2b checksum, written last

It is written into a hidden `.step-...tmp` folder and renamed when complete, and pruned by renaming it hidden
before deleting, so a folder with a checkpoint's name is always whole. A resume checks the manifest first: a
truncated, flipped or missing file is found before anything loads, and `resume=latest` falls back to the newest
checkpoint that checks out.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

from happyhorse_train.errors import RunHalted, UserInputError
from happyhorse_train.files import file_digest, write_atomic
from happyhorse_train.training.distributed import Replicated

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
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


def resolve_resume(output_dir: Path, resume: str | None, log: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to start over a run with checkpoints.

    `resume=latest` takes the newest checkpoint whose files match its manifest, saying which it skipped and why;
    a named checkpoint that does not match is refused.
    """
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
        for path in reversed(existing):
            damage = checkpoint_damage(path)
            if damage is None:
                return path
            log(f"checkpoint {path} is damaged ({damage}): trying the one before it")
        raise UserInputError(
            f"resume=latest: every checkpoint in {output_dir / CHECKPOINTS} is damaged (see above); start a new "
            "run in another output_dir"
        )
    path = Path(resume)
    if not (path / "trainer_state.json").is_file() and not (path / MANIFEST).is_file():
        raise UserInputError(f"resume={resume}: not a checkpoint folder (no trainer_state.json)")
    damage = checkpoint_damage(path)
    if damage is not None:
        raise UserInputError(
            f"resume={resume}: the checkpoint is damaged ({damage}); resume=latest takes the newest intact one"
        )
    return path


def write_manifest(folder: Path) -> None:
    """Record every file's size and checksum; written last, so its presence means the rest was complete."""
    files = {
        str(file.relative_to(folder)): {"bytes": file.stat().st_size, "blake2b": file_digest(file)}
        for file in sorted(folder.rglob("*")) if file.is_file() and file.name != MANIFEST
    }
    write_atomic(folder / MANIFEST, lambda path: path.write_text(json.dumps({"files": files}, indent=1)))


def checkpoint_damage(folder: Path) -> str | None:
    """Why `folder` does not match its manifest (the first file that differs), or None when every file does."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: its write did not finish"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    if "trainer_state.json" not in files:
        return f"{MANIFEST} lists no trainer_state.json"
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {expected['bytes']} were written"
        if file_digest(file) != expected["blake2b"]:
            return f"{name} does not match its checksum"
    return None


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
    """Write a checkpoint from every process (each its RNG, the main one the rest and the manifest); then prune."""
    accelerator = live.accelerator
    final = checkpoint_dir(output_dir, step)
    temporary = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed while writing this step
        temporary.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    failure = _attempt(lambda: _write_parts(live, temporary, step, trainer_state))
    # The manifest comes once every process's files are written (the reduce waits for all of them).
    if not _any_failed(accelerator, failure) and accelerator.is_main_process:
        failure = _attempt(lambda: write_manifest(temporary))
    if _any_failed(accelerator, failure):
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        reason = f" ({failure})" if failure is not None else " (on another process)"
        raise RunHalted(
            f"could not write the step-{step} checkpoint{reason}: is the disk full? {last_checkpoint_line(output_dir)}"
            "; free space, then continue with resume=latest"
        )
    if accelerator.is_main_process:
        _discard(final)
        temporary.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            _discard(old)
        for leftover in final.parent.glob(".step-*.deleting"):  # left by a run killed while pruning
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_parts(live: Checkpointable, folder: Path, step: int, trainer_state: dict) -> None:
    accelerator = live.accelerator
    # The engine's collective writes come first: a process that had given up on a write of its own before
    # them would leave the others waiting in their collectives.
    live.strategy.save_engine_state(accelerator, folder, live.model, live.optimizer)
    torch.save(rng_state(), folder / f"rng-rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(live.lr_schedule.state_dict(), folder / "scheduler.pt")
        if live.ema is not None:
            torch.save(live.ema.state_dict(), folder / "ema.pt")
        state = {**trainer_state, "step": step, "world_size": accelerator.num_processes, "engine": live.strategy.name}
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))


def _attempt(write: Callable[[], None]) -> Exception | None:
    try:
        write()
    except (OSError, RuntimeError, SafetensorError, CheckpointException) as error:  # a failed write, as each says
        return error
    return None


def _any_failed(accelerator, failure: Exception | None) -> bool:
    """Every process learns whether any write failed, so none waits for another that has given up."""
    flag = torch.tensor(float(failure is not None), device=accelerator.device)
    return accelerator.reduce(flag, "max").item() > 0


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder; renamed hidden first, so a kill mid-delete never leaves a partial one listed."""
    if not folder.exists():
        return
    doomed = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def last_checkpoint_line(output_dir: Path) -> str:
    """What a run that stops can promise about its checkpoints."""
    previous = list_checkpoints(output_dir)
    return f"the last complete checkpoint, {previous[-1]}, is intact" if previous else "no checkpoint was written yet"


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
