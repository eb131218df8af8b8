"""Checks on a training config's values and paths, run before anything loads, one clear line per problem.

(Unknown keys and wrong types are caught earlier by the structured schema in happyhorse_train/config.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

from happyhorse_train.combinations import combination_problems
from happyhorse_train.config import validation_on
from happyhorse_train.data.prepare import MANIFEST_FILE
from happyhorse_train.errors import UserInputError
from happyhorse_train.training.adapters import LORA_INIT
from happyhorse_train.training.flow_matching import LOSS_WEIGHTING, SIGMA_SAMPLING
from happyhorse_train.training.optim import OPTIMIZERS, SCHEDULES

CHOICES = {
    "trainer.mode": ("lora", "full"),
    "trainer.mixed_precision": ("bf16", "fp16", "no"),
    "lora.init": tuple(LORA_INIT),
    "flow.sigma_sampling": SIGMA_SAMPLING,
    "flow.loss_weighting": LOSS_WEIGHTING,
    "optimizer.name": OPTIMIZERS,
    "optimizer.scheduler": tuple(SCHEDULES),
    "logging.logger": ("wandb", "tensorboard", "none"),
    "logging.wandb_mode": ("offline", "online"),
}


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = value[part]
    return value


def check_train_config(cfg) -> None:
    problems = []
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            problems.append(f"{key}={_get(cfg, key)!r}: use one of {', '.join(allowed)}")
    positive = [
        "trainer.max_steps", "trainer.gradient_accumulation_steps", "trainer.log_every", "data.batch_size",
        "optimizer.lr",
    ]
    if cfg.trainer.mode == "lora":
        positive += ["lora.rank", "lora.alpha"]
    problems += [f"{key}={_get(cfg, key)}: must be greater than 0" for key in positive if not _get(cfg, key) > 0]
    non_negative = ["data.num_workers", "optimizer.max_grad_norm", "optimizer.warmup_steps",
                    "optimizer.weight_decay", "trainer.checkpoint_every", "trainer.keep_checkpoints"]
    problems += [f"{key}={_get(cfg, key)}: must be 0 or more" for key in non_negative if _get(cfg, key) < 0]
    problems += _optimizer_problems(cfg.optimizer)
    for key in ("data.caption_dropout", "lora.dropout"):
        if not 0 <= _get(cfg, key) < 1:
            problems.append(f"{key}={_get(cfg, key)}: must be in [0, 1)")
    problems += combination_problems(cfg)  # memory.base_weights's choices too; the engine's: once it starts
    from happyhorse_train.models.lora_formats import LORA_FORMATS

    for layout in cfg.lora.save_formats or []:
        if layout not in LORA_FORMATS:
            problems.append(f"lora.save_formats has {layout!r}: use any of {', '.join(LORA_FORMATS)}")
    if cfg.lora.save_formats is not None and not cfg.lora.save_formats:
        problems.append("lora.save_formats=[] writes no LoRA: name a layout, or null for the backbone's")
    if cfg.trainer.ema and not 0 < cfg.trainer.ema_decay < 1:
        problems.append(f"trainer.ema_decay={cfg.trainer.ema_decay}: must be in (0, 1)")
    if validation_on(cfg):  # (its height and width are checked against the model's own rule once it loads)
        frames = cfg.validation.num_frames
        if frames < 1 or (frames - 1) % 4:  # every shipped VAE compresses time 4x, keeping the first frame
            problems.append(f"validation.num_frames={frames}: must be 4k+1 (e.g. {max(1, (frames - 1) // 4 * 4 + 1)})")
    problems += _eval_problems(cfg.eval)
    if cfg.model.path is None:
        problems.append("model.path is not set: point it at a diffusers-layout model folder")
    problems += _dataset_problems("data.dataset", cfg.data.dataset)
    if problems:
        raise UserInputError("bad training config:\n  " + "\n  ".join(problems))
    check_writable(Path(cfg.output_dir))


def _optimizer_problems(optimizer) -> list[str]:
    problems = []
    if len(optimizer.betas) != 2 or not all(0 <= beta < 1 for beta in optimizer.betas):
        problems.append(f"optimizer.betas={list(optimizer.betas)}: give two values in [0, 1), e.g. [0.9,0.999]")
    if not optimizer.eps > 0:
        problems.append(f"optimizer.eps={optimizer.eps}: must be greater than 0 (e.g. 1e-8)")
    return problems


def _eval_problems(evaluation) -> list[str]:
    problems = [f"eval.{key}={evaluation[key]}: must be 0 or more"
                for key in ("every", "held_out_clips", "train_clips") if evaluation[key] < 0]
    if not 0 <= evaluation.held_out < 1:
        problems.append(f"eval.held_out={evaluation.held_out}: must be in [0, 1)")
    if not evaluation.sigmas or not all(0 < sigma <= 1 for sigma in evaluation.sigmas):
        problems.append(f"eval.sigmas={list(evaluation.sigmas)}: give one or more noise levels in (0, 1]")
    if evaluation.dataset:
        problems += _dataset_problems("eval.dataset", evaluation.dataset)
    return problems


def _dataset_problems(key: str, folder: str) -> list[str]:
    if (Path(folder) / MANIFEST_FILE).is_file():
        return []
    return [f"{key}={folder}: not a clip dataset folder (run data_tools/prepare_clips.py)"]


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserInputError(f"output_dir={folder} is not writable ({error.strerror})") from error
