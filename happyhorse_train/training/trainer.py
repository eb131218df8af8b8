"""The training loop. It knows the config, Accelerate and the ModelSpec boundary, and no particular model."""

from __future__ import annotations

import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft.utils import get_peft_model_state_dict
from torch.utils.data import DataLoader
from tqdm import tqdm

from happyhorse_train.config import validation_on
from happyhorse_train.data.cache import LatentCache
from happyhorse_train.data.caching import fill_cache
from happyhorse_train.data.dataset import CachedClipDataset, collate_clips
from happyhorse_train.data.prepare import load_manifest
from happyhorse_train.data.sampler import BucketBatchSampler
from happyhorse_train.errors import RunHalted, UserInputError
from happyhorse_train.evaluation.loggers import RunLog
from happyhorse_train.evaluation.validation import render_validation
from happyhorse_train.memory.checkpointing import checkpointing_function, compile_blocks
from happyhorse_train.memory.offload import (
    BlockSwap,
    encoders_on_device_while_running,
    pipeline_encoders,
    repeated_blocks,
)
from happyhorse_train.memory.streamed_load import peak_host_ram_bytes
from happyhorse_train.models.geometry import video_latent_shape
from happyhorse_train.models.spec import get_spec
from happyhorse_train.training.adapters import make_trainable, trainable_parameters
from happyhorse_train.training.distributed import distributed_strategy, gradient_accumulation
from happyhorse_train.training.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from happyhorse_train.training.ema import EMA
from happyhorse_train.training.optim import build_lr_schedule, build_optimizer
from happyhorse_train.training.step import flow_matching_loss, sample_generator
from happyhorse_train.runtime import accelerator_options

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checks it between steps, so the run stops at a checkpoint."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def __enter__(self) -> StopRequest:
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def _handle(self, number, frame) -> None:
        self.signal_name = signal.Signals(number).name

    def agreed(self, accelerator) -> bool:
        """True on every process once any process was signalled (a stop on one rank alone would hang the rest)."""
        flag = torch.tensor(1.0 if self.signal_name else 0.0, device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batches_in_epoch: int = 0  # batches this process has trained on in the current epoch
    skipped_steps: int = 0  # steps skipped for a non-finite gradient, in all
    nonfinite_in_a_row: int = 0


def train(cfg) -> Path:
    from accelerate import Accelerator

    output_dir = Path(cfg.output_dir)
    resume_from = resolve_resume(output_dir, cfg.resume)
    accelerator = Accelerator(
        mixed_precision=cfg.trainer.mixed_precision,
        gradient_accumulation_plugin=gradient_accumulation(cfg.trainer.gradient_accumulation_steps),
        log_with=None if cfg.logging.logger == "none" else cfg.logging.logger,
        project_dir=str(output_dir),
        **accelerator_options(),
    )
    compute_dtype = COMPUTE_DTYPES[cfg.trainer.mixed_precision]
    rank, world = accelerator.process_index, accelerator.num_processes
    strategy = distributed_strategy(accelerator)
    strategy.check_supported(cfg)

    # --- the model and the data -----------------------------------------------------------------
    spec = get_spec(cfg.model.backbone, cfg.data.max_sequence_length)
    # A LoRA's frozen base loads straight in the compute dtype (an 8B float32 copy would be 32 GB of host RAM);
    # a full fine-tune keeps float32 master weights.
    load_dtype = compute_dtype if cfg.trainer.mode == "lora" else torch.float32
    manifest = load_manifest(cfg.data.dataset)
    batch_sampler(manifest["bucket"], cfg, rank, world)  # before loading: a batch size no bucket fills fails here
    # The transformer stays off the GPU while the encoders fill the cache (a quantized one is not even loaded
    # yet): the two together would not fit the cards the memory settings are for.
    with strategy.loading():
        pipe = spec.load_pipeline(
            cfg.model.path, accelerator.device, load_dtype, cfg.memory.base_weights, accelerator.print,
            transformer_to_device=False,
        )
    pipe.set_progress_bar_config(disable=True)
    for bucket in sorted(set(manifest["bucket"])):  # before any encoding: a shape the model cannot take fails here
        frames, height, width = (int(part) for part in bucket.split("x"))
        try:
            video_latent_shape(pipe, height, width, frames)
        except UserInputError as error:
            raise UserInputError(f"dataset bucket {bucket} does not fit {cfg.model.preset}: {error}") from error
    if validation_on(cfg):  # the model's own size rule, rather than finding out at the first render
        try:
            video_latent_shape(pipe, cfg.validation.height, cfg.validation.width, cfg.validation.num_frames)
        except UserInputError as error:
            raise UserInputError(f"validation size does not fit {cfg.model.preset}: {error}") from error
    cache = LatentCache(cfg.data.cache or Path(cfg.data.dataset) / "cache")
    if cfg.data.verify_cache and accelerator.is_main_process:
        for shard, why in cache.verify():
            accelerator.print(f"cache: {shard} moved to {cache.folder / 'corrupt'} ({why}); its entries are re-encoded")
    accelerator.wait_for_everyone()
    cache.refresh()
    encoder = spec.clip_encoder(pipe, cfg.model.path)
    fill_cache(manifest, cache, encoder, rank, world, progress=accelerator.is_local_main_process)
    accelerator.wait_for_everyone()
    cache.refresh()
    for component in pipeline_encoders(pipe):  # everything they make is cached: their GPU memory goes to training
        component.to("cpu")
    spec.place_transformer(
        pipe, cfg.model.path, accelerator.device, load_dtype, cfg.memory.base_weights, accelerator.print
    )
    dataset = CachedClipDataset(manifest, cache, encoder.video_id, encoder.text_id)
    if len(dataset) == 0:
        raise UserInputError(f"no clip of {cfg.data.dataset} could be cached; see {cache.folder}/failures-rank*.json")
    empty_text = cache.get(dataset.empty_text_key)["text"]

    # --- what trains, and how -------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the same adapter initialization in every process
    transformer = pipe.transformer
    lora_config = make_trainable(transformer, cfg.trainer.mode, cfg.lora, spec.default_lora_targets, compute_dtype)
    if cfg.trainer.gradient_checkpointing:
        transformer.enable_gradient_checkpointing(checkpointing_function(transformer, cfg))
    if cfg.trainer.compile:
        compile_blocks(transformer)
    transformer.train()
    params = list(trainable_parameters(transformer).values())
    optimizer = build_optimizer(params, cfg.optimizer)
    lr_schedule = build_lr_schedule(optimizer, cfg.optimizer, cfg.trainer.max_steps)
    ema = EMA(params, cfg.trainer.ema_decay) if cfg.trainer.ema else None  # (refused by FSDP, which replaces params)
    trainable_count = sum(p.numel() for p in params)  # before ZeRO-3 or FSDP shards them
    strategy.configure(cfg)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    params = list(trainable_parameters(accelerator.unwrap_model(model)).values())  # FSDP made new ones (DTensors)
    if cfg.memory.blocks_to_swap:  # after prepare, which moves the whole model to the device
        swap = BlockSwap(repeated_blocks(transformer), cfg.memory.blocks_to_swap, accelerator.device)
        accelerator.print(f"block swap: blocks {swap.swapped} live in host RAM, streamed in ahead of use")
    sampler = batch_sampler(dataset.buckets, cfg, rank, world)

    state = TrainState()
    if resume_from is not None:
        saved = load_checkpoint(accelerator, resume_from, model, optimizer, lr_schedule, ema)
        state = TrainState(**{key: saved[key] for key in asdict(state)})
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
        changes = sampler.differences(saved["sampler"]) if "sampler" in saved else []
        if changes:  # the saved position indexes a batch list that no longer exists
            state.batches_in_epoch = 0
            accelerator.print(
                f"the clips or the batch settings changed since that checkpoint ({'; '.join(changes)}): epoch "
                f"{state.epoch} starts over with the dataset as it is now"
            )
    run_log = RunLog(accelerator, output_dir, cfg, state.step)
    accelerator.print(
        f"training {cfg.trainer.mode} on {len(dataset)} clips ({len(dataset.missing)} not cached), "
        f"{trainable_count:,} trainable parameters, {world} process(es)"
    )

    # --- the loop -------------------------------------------------------------------------------
    accumulation = cfg.trainer.gradient_accumulation_steps
    progress = tqdm(
        total=cfg.trainer.max_steps, initial=state.step, desc="training", disable=not accelerator.is_main_process
    )
    window = _new_window(accelerator.device)
    micro_step = 0
    with StopRequest() as stop, progress:  # the signal handlers go back however the loop ends
        while state.step < cfg.trainer.max_steps:
            sampler.set_epoch(state.epoch)
            sampler.load_state_dict({**sampler.state_dict(), "batches_yielded": state.batches_in_epoch})
            loader = DataLoader(
                dataset, batch_sampler=sampler, collate_fn=collate_clips, num_workers=cfg.data.num_workers
            )
            for batch in loader:
                state.batches_in_epoch += 1
                generators = [
                    sample_generator(cfg.seed, state.step, micro_step % accumulation, clip_id)
                    for clip_id in batch["clip_ids"]
                ]
                micro_step += 1
                with accelerator.accumulate(model):  # also tells DeepSpeed where the accumulation boundary is
                    loss, tokens = flow_matching_loss(
                        batch, generators, cfg, spec, pipe, model, empty_text, accelerator.device, compute_dtype
                    )
                    accelerator.backward(loss)  # divided by the accumulation steps (by accelerate, or DeepSpeed)
                window["loss"] += loss.detach().float() / accumulation  # stays on the device: no sync per batch
                window["samples"] += batch["latent_mean"].shape[0]
                window["tokens"] += tokens
                if not accelerator.sync_gradients:
                    continue

                max_norm = cfg.optimizer.max_grad_norm or float("inf")
                grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(params, max_norm))
                if not torch.isfinite(grad_norm):
                    strategy.check_nonfinite_recoverable(state.step)
                    # Gradients are all-reduced, so every process sees the same norm and skips together.
                    optimizer.zero_grad(set_to_none=True)
                    state.skipped_steps += 1
                    state.nonfinite_in_a_row += 1
                    if state.nonfinite_in_a_row >= cfg.trainer.max_consecutive_nonfinite:
                        raise RunHalted(
                            f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (at step "
                            f"{state.step}); stopping. Lower optimizer.lr or check the data; the last checkpoint is "
                            "intact."
                        )
                    window = {**_new_window(accelerator.device), "started": window["started"]}
                    continue
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(params)
                state.step += 1
                state.nonfinite_in_a_row = 0
                progress.update()

                seconds = time.perf_counter() - window["started"]
                metrics = {
                    "loss": accelerator.reduce(window["loss"], "mean").item(),
                    "lr": lr_schedule.get_last_lr()[0],
                    "grad_norm": grad_norm.item(),
                    "samples_per_s": window["samples"] * world / seconds,
                    "tokens_per_s": window["tokens"] * world / seconds,
                    "skipped_steps": state.skipped_steps,
                }
                if torch.cuda.is_available():
                    metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                metrics["host_ram_peak_gb"] = peak_host_ram_bytes() / 2**30
                run_log.log_step(metrics, state.step, to_tracker=state.step % cfg.trainer.log_every == 0)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}")
                window = _new_window(accelerator.device)

                done = state.step >= cfg.trainer.max_steps
                interrupted = not done and stop.agreed(accelerator)
                periodic = cfg.trainer.checkpoint_every and state.step % cfg.trainer.checkpoint_every == 0
                if done or interrupted or periodic:
                    save_checkpoint(
                        accelerator, output_dir, state.step, model, optimizer, lr_schedule, ema,
                        {**asdict(state), "sampler": sampler.state_dict()}, cfg.trainer.keep_checkpoints,
                    )
                if validation_on(cfg) and (done or state.step % cfg.validation.every == 0):
                    if accelerator.is_main_process:
                        folder = output_dir / "validation" / f"step-{state.step:08d}"
                        with encoders_on_device_while_running(pipe, accelerator.device):
                            paths = render_validation(pipe, cfg.validation, folder, accelerator.autocast)
                        run_log.log_videos(paths, list(cfg.validation.prompts), state.step)
                    accelerator.wait_for_everyone()
                if interrupted:
                    run_log.finish()
                    accelerator.print(
                        f"stopped by {stop.signal_name} at step {state.step}; checkpoint written. "
                        f"Continue with: resume=latest output_dir={output_dir}"
                    )
                    return output_dir
                if done:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0

    # --- the result -----------------------------------------------------------------------------
    if ema is not None:
        ema.copy_to(params)  # the averaged weights are the result
    weights = strategy.gathered_weights(accelerator, model)  # every process takes part: ZeRO-3 / FSDP gather here
    if accelerator.is_main_process:
        if lora_config is not None:
            spec.save_lora(
                output_dir / "lora",
                transformer,
                get_peft_model_state_dict(transformer, state_dict=weights),
                lora_config.to_dict(),
                {"happyhorse_train": {"config": OmegaConf.to_container(cfg, resolve=True), "step": state.step}},
                formats=tuple(cfg.lora.save_formats),
            )
            accelerator.print(f"wrote the LoRA to {output_dir / 'lora'}")
        else:
            spec.save_transformer(output_dir / "transformer", transformer, weights)
            accelerator.print(f"wrote the transformer to {output_dir / 'transformer'}")
    accelerator.wait_for_everyone()
    run_log.finish()  # last: accelerate's end_training also ends the process group
    return output_dir


def batch_sampler(buckets, cfg, rank: int, world: int) -> BucketBatchSampler:
    """This process's batches of `buckets` (one clip's bucket each); refuses a batch size that makes none (the
    loop would wait forever for its first batch)."""
    sampler = BucketBatchSampler(list(buckets), cfg.data.batch_size, cfg.seed, rank, world)
    if len(sampler) == 0:
        largest = max(Counter(buckets).values())
        raise UserInputError(
            f"data.batch_size={cfg.data.batch_size} makes no full batch for {world} process(es): the largest "
            f"bucket of {cfg.data.dataset} holds {largest} usable clip(s), and a batch takes clips of one bucket "
            "(a bucket's last partial batch is dropped). Lower data.batch_size, or add clips"
        )
    return sampler


def _new_window(device: torch.device) -> dict:
    """Sums over the batches since the last logged step."""
    return {"loss": torch.zeros((), device=device), "samples": 0, "tokens": 0, "started": time.perf_counter()}
