"""The training loop. It knows the config, Accelerate and the ModelSpec boundary, and no particular model."""

from __future__ import annotations

import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from tqdm import tqdm

from happyhorse_train.config import validation_on
from happyhorse_train.data.dataset import collate_clips
from happyhorse_train.errors import RunHalted
from happyhorse_train.memory.offload import encoders_on_device_while_running
from happyhorse_train.memory.streamed_load import peak_host_ram_bytes
from happyhorse_train.rendering.validation import render_validation
from happyhorse_train.training.adapters import lora_save_formats
from happyhorse_train.training.checkpoint import last_checkpoint_line, save_checkpoint
from happyhorse_train.training.eval_loss import eval_losses
from happyhorse_train.training.run_setup import Run, set_up_run
from happyhorse_train.training.step import BatchLoss, batch_loss, sample_generator

STOP_FILE = "STOP"


class StopRequest:
    """SIGTERM / SIGINT, or a file named STOP in the output folder, ask for a stop; the loop checks between steps,
    so the run stops at a checkpoint. The file is for runs under a launcher: a signal to `accelerate launch`
    makes it exit 143 however cleanly its workers stopped, while a run stopped by the file exits 0."""

    def __init__(self, stop_file: Path):
        self.stop_file = stop_file
        self.reason: str | None = None  # what asked, once something did (on the main process, for the message)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def _handle(self, number, frame) -> None:
        self.reason = signal.Signals(number).name

    def agreed(self, accelerator) -> bool:
        """True on every process once any process was signalled or the main one sees the file (a stop on one
        rank alone would hang the rest)."""
        if self.reason is None and accelerator.is_main_process and self.stop_file.exists():
            self.reason = str(self.stop_file)
            self.stop_file.unlink(missing_ok=True)  # read once: a resumed run must not stop again at once
        flag = torch.tensor(1.0 if self.reason else 0.0, device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg) -> Path:
    run = set_up_run(cfg)
    accelerator, state, max_steps = run.accelerator, run.state, cfg.trainer.max_steps
    progress = tqdm(total=max_steps, initial=state.step, desc="training", disable=not accelerator.is_main_process)
    window = MetricsWindow(accelerator.device, cfg.trainer.gradient_accumulation_steps)
    if state.step == 0:
        log_eval_loss(run)  # the baseline the later evals compare with
    with StopRequest(run.output_dir / STOP_FILE) as stop, progress:  # the signal handlers go back however the loop ends
        for batch, generators in batches(run):
            with accelerator.accumulate(run.model):  # also tells DeepSpeed where the accumulation boundary is
                losses = batch_loss(batch, generators, run.step_context)
                accelerator.backward(losses.loss)  # divided by the accumulation steps (by accelerate, or DeepSpeed)
            window.add(losses, len(generators))
            if not accelerator.sync_gradients:
                continue
            grad_norm = optimizer_step(run)
            if grad_norm is None:  # skipped: a non-finite gradient
                window.clear(keep_start=True)
                continue
            progress.update()
            metrics = log_metrics(run, window, grad_norm)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            window.clear()
            interrupted = state.step < max_steps and stop.agreed(accelerator)
            after_step(run, interrupted)
            if interrupted:
                run.run_log.finish()
                accelerator.print(
                    f"stopped by {stop.reason} at step {state.step}; checkpoint written. "
                    f"Continue with: resume=latest output_dir={run.output_dir}"
                )
                return run.output_dir
            if state.step >= max_steps:
                break
    export(run)
    return run.output_dir


def batches(run: Run):
    """(host batch, one generator per sample) until the last step, epoch after epoch, from the saved position."""
    state, sampler, cfg = run.state, run.sampler, run.cfg
    accumulation = cfg.trainer.gradient_accumulation_steps
    micro_step = 0
    while state.step < cfg.trainer.max_steps:
        sampler.set_epoch(state.epoch)
        sampler.load_state_dict({**sampler.state_dict(), "batches_yielded": state.batches_in_epoch})
        loader = DataLoader(run.dataset, batch_sampler=sampler, collate_fn=collate_clips,
                            num_workers=cfg.data.num_workers)
        for batch in loader:
            state.batches_in_epoch += 1
            yield batch, [
                sample_generator(cfg.seed, state.step, micro_step % accumulation, clip_id)
                for clip_id in batch["clip_ids"]
            ]
            micro_step += 1
        state.epoch += 1
        state.batches_in_epoch = 0


def optimizer_step(run: Run) -> torch.Tensor | None:
    """Clip and step at an accumulation boundary; the gradient norm, or None when a non-finite one was skipped."""
    cfg, state, optimizer = run.cfg, run.state, run.optimizer
    max_norm = cfg.optimizer.max_grad_norm or float("inf")
    grad_norm = torch.as_tensor(run.accelerator.clip_grad_norm_(run.params, max_norm))
    if not torch.isfinite(grad_norm):
        run.strategy.check_nonfinite_recoverable(state.step)
        # Gradients are all-reduced, so every process sees the same norm and skips together.
        optimizer.zero_grad(set_to_none=True)
        state.skipped_steps += 1
        state.nonfinite_in_a_row += 1
        if state.nonfinite_in_a_row >= cfg.trainer.max_consecutive_nonfinite:
            raise RunHalted(
                f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (at step "
                f"{state.step}); stopping. Lower optimizer.lr or check the data; {last_checkpoint_line(run.output_dir)}"
            )
        return None
    optimizer.step()
    run.lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.params)
    state.step += 1
    state.nonfinite_in_a_row = 0
    return grad_norm


class MetricsWindow:
    """Sums over the batches since the last logged step; the loss stays on the device (no sync per batch)."""

    def __init__(self, device: torch.device, accumulation: int):
        self.device, self.accumulation = device, accumulation
        self.clear()

    def clear(self, keep_start: bool = False) -> None:
        self.losses = torch.zeros(2, device=self.device)  # weighted, unweighted
        self.samples, self.tokens = 0, 0
        if not keep_start:
            self.started = time.perf_counter()

    def add(self, losses: BatchLoss, samples: int) -> None:
        self.losses += torch.stack([losses.loss.detach().float(), losses.unweighted.float()]) / self.accumulation
        self.samples += samples
        self.tokens += losses.tokens


def log_metrics(run: Run, window: MetricsWindow, grad_norm: torch.Tensor) -> dict:
    accelerator, step = run.accelerator, run.state.step
    seconds, world = time.perf_counter() - window.started, accelerator.num_processes
    loss, unweighted = accelerator.reduce(window.losses, "mean").tolist()
    metrics = {
        "loss": loss,
        "loss_unweighted": unweighted,
        "lr": run.lr_schedule.get_last_lr()[0],
        "grad_norm": grad_norm.item(),
        "samples_per_s": window.samples * world / seconds,
        "tokens_per_s": window.tokens * world / seconds,
        "skipped_steps": run.state.skipped_steps,
    }
    if torch.cuda.is_available():
        metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    metrics["host_ram_peak_gb"] = peak_host_ram_bytes() / 2**30
    run.run_log.log_step(metrics, step, to_tracker=step % run.cfg.trainer.log_every == 0)
    return metrics


def log_eval_loss(run: Run) -> None:
    if run.eval_set is not None:
        metrics = eval_losses(run.eval_set, run.step_context, run.accelerator)
        run.run_log.log_step(metrics, run.state.step, to_tracker=True)
        if run.accelerator.is_main_process:
            tqdm.write(f"step {run.state.step}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))


def after_step(run: Run, interrupted: bool) -> None:
    """The eval loss, the checkpoint (periodic, last, or before a requested stop) and validation videos."""
    cfg, step = run.cfg, run.state.step
    done = step >= cfg.trainer.max_steps
    if done or (cfg.eval.every and step % cfg.eval.every == 0):  # before the checkpoint: a resume redoes both
        log_eval_loss(run)
    if done or interrupted or (cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0):
        trainer_state = {**asdict(run.state), "sampler": run.sampler.state_dict()}
        save_checkpoint(run, run.output_dir, step, trainer_state, cfg.trainer.keep_checkpoints)
    if validation_on(cfg) and (done or step % cfg.validation.every == 0):
        if run.accelerator.is_main_process:
            folder = run.output_dir / "validation" / f"step-{step:08d}"
            with encoders_on_device_while_running(run.pipe, run.accelerator.device):
                paths = render_validation(run.pipe, cfg.validation, folder, run.accelerator.autocast,
                                          run.validation_images)
            run.run_log.log_videos(paths, list(cfg.validation.prompts), step)
        run.accelerator.wait_for_everyone()


def export(run: Run) -> None:
    """The result: the LoRA (diffusers and asked-for layouts) or the whole transformer, then the tracker closed."""
    accelerator = run.accelerator
    if run.ema is not None:
        run.ema.copy_to(run.params)  # the averaged weights are the result
    weights = run.strategy.gathered_weights(accelerator, run.model)  # every process: ZeRO-3 / FSDP gather here
    if accelerator.is_main_process:
        try:
            accelerator.print(f"wrote the {write_result(run, weights)}")
        except (OSError, SafetensorError) as error:
            raise RunHalted(
                f"could not write the trained weights into {run.output_dir} ({error}): is the disk full? "
                f"{last_checkpoint_line(run.output_dir)}; free space, then run again with resume=latest to write them"
            ) from error
    accelerator.wait_for_everyone()
    run.run_log.finish()  # last: accelerate's end_training also ends the process group


def write_result(run: Run, weights: dict) -> str:
    """Write the LoRA or the transformer; returns what was written, and where."""
    cfg, folder = run.cfg, run.output_dir
    if run.lora_config is None:
        run.spec.save_transformer(folder / "transformer", run.transformer, weights)
        return f"transformer to {folder / 'transformer'}"
    run.spec.save_lora(
        folder / "lora",
        run.transformer,
        get_peft_model_state_dict(run.transformer, state_dict=weights),
        run.lora_config.to_dict(),
        {"happyhorse_train": {"config": OmegaConf.to_container(cfg, resolve=True), "step": run.state.step}},
        formats=lora_save_formats(cfg.lora, run.spec),
    )
    return f"LoRA to {folder / 'lora'}"
