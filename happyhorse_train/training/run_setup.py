"""Everything the training loop needs before its first step, built by named steps: the accelerator and engine,
the cached data, the trainable model and optimizer, and the state of a resumed run."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from happyhorse_train.config import validation_on
from happyhorse_train.data.cache_fill import fill_cache
from happyhorse_train.data.dataset import CachedClipDataset
from happyhorse_train.data.latent_cache import LatentCache
from happyhorse_train.data.loss_masks import fill_masks
from happyhorse_train.data.prepare import load_manifest
from happyhorse_train.data.sampler import BucketBatchSampler, unused_clips
from happyhorse_train.errors import UserInputError
from happyhorse_train.memory.offload import BlockSwap, pipeline_encoders, repeated_blocks
from happyhorse_train.memory.recompute import checkpointing_function, compile_blocks
from happyhorse_train.memory.streamed_load import base_transformer, place_transformer
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.geometry import video_latent_shape
from happyhorse_train.rendering.videos import condition_images
from happyhorse_train.training.adapters import check_layout_names, make_trainable, trainable_parameters
from happyhorse_train.training.checkpoint import Checkpointable, load_checkpoint, resolve_resume
from happyhorse_train.training.distributed import (
    accelerator_options,
    distributed_strategy,
    gradient_accumulation,
    stop_with_launcher,
)
from happyhorse_train.training.ema import EMA
from happyhorse_train.training.eval_loss import EvalSet, build_eval_set, held_out_fingerprints
from happyhorse_train.training.optim import build_lr_schedule, build_optimizer
from happyhorse_train.training.run_lock import RunLock, lock_output_dir
from happyhorse_train.training.run_log import RunLog
from happyhorse_train.training.step import StepContext

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batches_in_epoch: int = 0  # batches this process has trained on in the current epoch
    skipped_steps: int = 0  # steps skipped for a non-finite gradient, in all
    nonfinite_in_a_row: int = 0


@dataclass
class Run(Checkpointable):
    """One training run, ready for its next step."""

    cfg: object
    output_dir: Path
    spec: object  # the ModelSpec
    pipe: object
    transformer: torch.nn.Module  # the model before accelerate wrapped it (what the exports save)
    params: list[torch.nn.Parameter]  # what trains, as the engine holds it
    lora_config: object | None  # peft's LoraConfig; None for a full fine-tune
    dataset: CachedClipDataset
    sampler: BucketBatchSampler
    state: TrainState
    step_context: StepContext | None = None  # set once the model is prepared
    eval_set: EvalSet | None = None  # None: no eval loss (eval.every=0)
    run_log: RunLog | None = None  # set once the resumed step is known
    run_lock: RunLock | None = None  # the main process's lock on output_dir: this reference keeps it held
    validation_images: list | None = None  # each validation prompt's first frame (image-to-video models)


def set_up_run(cfg) -> Run:
    from accelerate import Accelerator

    stop_with_launcher()
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.trainer.mixed_precision,
        gradient_accumulation_plugin=gradient_accumulation(cfg.trainer.gradient_accumulation_steps),
        log_with=None if cfg.logging.logger == "none" else cfg.logging.logger,
        project_dir=str(output_dir),
        **accelerator_options(),
    )
    run_lock = lock_output_dir(accelerator, output_dir)  # before anything in output_dir is read or written
    strategy = distributed_strategy(accelerator)
    strategy.check_supported(cfg)
    resume_from = resolve_resume(output_dir, cfg.resume, accelerator.print)  # verified before anything loads
    compute_dtype = COMPUTE_DTYPES[cfg.trainer.mixed_precision]
    spec = get_spec(cfg.model.backbone, cfg.data.max_sequence_length)
    pipe, dataset, held_out, empty_text, images = load_cached_data(cfg, accelerator, strategy, spec, compute_dtype)
    run = make_trainable_run(cfg, accelerator, strategy, spec, pipe, dataset, compute_dtype)
    run.run_lock, run.validation_images = run_lock, images
    run.step_context = StepContext(
        spec, pipe, run.model, accelerator.device, compute_dtype, cfg.flow, cfg.data.caption_dropout, empty_text
    )
    run.eval_set = build_eval_set(cfg, dataset, held_out)
    if run.eval_set is not None:
        accelerator.print(f"eval loss every {cfg.eval.every} steps: {run.eval_set.describe()}")
    if resume_from is not None:
        restore(run, resume_from)
    run.run_log = RunLog(accelerator, output_dir, cfg, run.state.step)
    return run


def load_cached_data(cfg, accelerator, strategy, spec, compute_dtype):
    """The pipeline, with every clip's latents and caption states cached; returns (pipe, the training clips, the
    held-out clips or None, the empty caption's text states, the validation images or None)."""
    rank, world, log = accelerator.process_index, accelerator.num_processes, accelerator.print
    # A LoRA's frozen base loads straight in the compute dtype (an 8B float32 copy would be 32 GB of host RAM);
    # a full fine-tune keeps float32 master weights.
    load_dtype = compute_dtype if cfg.trainer.mode == "lora" else torch.float32
    manifest, held_out = split_eval_clips(cfg)
    batch_sampler(manifest["bucket"], cfg, rank, world, log)  # before loading: a batch size no bucket fills fails here
    # The transformer stays off the GPU while the encoders fill the cache (a quantized one is not even loaded
    # yet): the two together would not fit the cards the memory settings are for.
    with strategy.loading():
        deferred = base_transformer(spec, cfg.model.path, cfg.memory.base_weights, accelerator.device, load_dtype,
                                    log, deferred=True)
        pipe = spec.load_pipeline(cfg.model.path, accelerator.device, load_dtype, transformer=deferred,
                                  transformer_to_device=False)
    pipe.set_progress_bar_config(disable=True)
    check_sizes(cfg, pipe, set(manifest["bucket"]) | set(held_out["bucket"] if held_out else []))
    images = None
    if validation_on(cfg):  # before anything is encoded: an image-to-video model needs its first frames
        images = condition_images(spec, pipe.transformer, list(cfg.validation.images), len(cfg.validation.prompts),
                                  "validation.images")
    cache = LatentCache(cfg.data.cache or Path(cfg.data.dataset) / "cache")
    if accelerator.is_main_process:
        for line in cache.check(cfg.data.verify_cache):
            log(line)
    accelerator.wait_for_everyone()
    cache.refresh()
    encoder = spec.clip_encoder(pipe, cfg.model.path)
    for clips in (manifest, held_out) if held_out else (manifest,):
        fill_cache(clips, cache, encoder, rank, world, progress=accelerator.is_local_main_process)
        for failure in fill_masks(clips, cache, encoder.video_id, pipe.vae_scale_factor_temporal,
                                  pipe.vae_scale_factor_spatial, rank, world):
            print(f"loss mask {failure['source']}: {failure['reason']}; its clip is left out")
    accelerator.wait_for_everyone()
    cache.refresh()
    for component in pipeline_encoders(pipe):  # everything they make is cached: their GPU memory goes to training
        component.to("cpu")
    place_transformer(pipe, spec, cfg.model.path, cfg.memory.base_weights, accelerator.device, load_dtype, log)
    dataset = CachedClipDataset(manifest, cache, encoder.video_id, encoder.text_id)
    if len(dataset) == 0:
        raise UserInputError(f"no clip of {cfg.data.dataset} could be cached; see {cache.folder}/failures-rank*.json")
    held_out = CachedClipDataset(held_out, cache, encoder.video_id, encoder.text_id) if held_out else None
    return pipe, dataset, held_out, cache.get(dataset.empty_text_key)["text"], images


def split_eval_clips(cfg):
    """(the clips to train on, the never-trained clips to evaluate on or None), as manifests: eval.dataset's
    clips, or the held-out share of data.dataset's source videos (none while eval is off)."""
    manifest = load_manifest(cfg.data.dataset)
    if not cfg.eval.every:
        return manifest, None
    if cfg.eval.dataset:
        return manifest, load_manifest(cfg.eval.dataset)
    held_out = held_out_fingerprints(manifest["fingerprint"], cfg.eval.held_out)
    if not held_out:
        return manifest, None
    keep = [i for i, fingerprint in enumerate(manifest["fingerprint"]) if fingerprint not in held_out]
    split_off = [i for i, fingerprint in enumerate(manifest["fingerprint"]) if fingerprint in held_out]
    return manifest.select(keep), manifest.select(split_off)


def check_sizes(cfg, pipe, buckets) -> None:
    """Every dataset bucket and the validation size, by the model's own rule, before anything is encoded."""
    sizes = [(f"dataset bucket {bucket}", *(int(part) for part in bucket.split("x"))) for bucket in sorted(buckets)]
    if validation_on(cfg):
        sizes.append(("validation size", cfg.validation.num_frames, cfg.validation.height, cfg.validation.width))
    for what, frames, height, width in sizes:
        try:
            video_latent_shape(pipe, height, width, frames)
        except UserInputError as error:
            raise UserInputError(f"{what} does not fit {cfg.model.preset}: {error}") from error


def make_trainable_run(cfg, accelerator, strategy, spec, pipe, dataset, compute_dtype) -> Run:
    """What trains and how: adapters or every weight, the memory techniques, the optimizer, the engine."""
    torch.manual_seed(cfg.seed)  # the same adapter initialization in every process
    transformer = pipe.transformer
    lora_config = make_trainable(transformer, cfg.trainer.mode, cfg.lora, spec, compute_dtype)
    if lora_config is not None:
        check_layout_names(transformer, cfg.lora, spec)
    if cfg.trainer.gradient_checkpointing:
        transformer.enable_gradient_checkpointing(checkpointing_function(transformer, cfg))
    if cfg.trainer.compile:
        compile_blocks(transformer)
    transformer.train()
    params = list(trainable_parameters(transformer).values())
    accelerator.print(  # counted before ZeRO-3 or FSDP shard them
        f"training {cfg.trainer.mode} on {len(dataset)} clips ({len(dataset.missing)} not cached), "
        f"{sum(p.numel() for p in params):,} trainable parameters, {accelerator.num_processes} process(es)"
    )
    optimizer = build_optimizer(params, cfg.optimizer)
    lr_schedule = build_lr_schedule(optimizer, cfg.optimizer, cfg.trainer.max_steps)
    ema = EMA(params, cfg.trainer.ema_decay) if cfg.trainer.ema else None  # (refused by FSDP, which replaces params)
    strategy.configure(cfg)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    params = list(trainable_parameters(accelerator.unwrap_model(model)).values())  # FSDP made new ones (DTensors)
    if cfg.memory.blocks_to_swap:  # after prepare, which moves the whole model to the device
        swap = BlockSwap(repeated_blocks(transformer), cfg.memory.blocks_to_swap, accelerator.device)
        accelerator.print(f"block swap: blocks {swap.swapped} live in host RAM, streamed in ahead of use")
    sampler = batch_sampler(dataset.buckets, cfg, accelerator.process_index, accelerator.num_processes)
    return Run(
        accelerator, strategy, model, optimizer, lr_schedule, ema, cfg=cfg, output_dir=Path(cfg.output_dir),
        spec=spec, pipe=pipe, transformer=transformer, params=params, lora_config=lora_config, dataset=dataset,
        sampler=sampler, state=TrainState(),
    )


def restore(run: Run, checkpoint: Path) -> None:
    """The weights, optimizer, schedule, random states and data position of `checkpoint`."""
    saved = load_checkpoint(run, checkpoint)
    run.state = TrainState(**{key: saved[key] for key in asdict(run.state)})
    run.accelerator.print(f"resumed from {checkpoint} at step {run.state.step}")
    changes = run.sampler.differences(saved["sampler"]) if "sampler" in saved else []
    if changes:  # the saved position indexes a batch list that no longer exists
        run.state.batches_in_epoch = 0
        run.accelerator.print(
            f"the clips or the batch settings changed since that checkpoint ({'; '.join(changes)}): epoch "
            f"{run.state.epoch} starts over with the dataset as it is now"
        )


def batch_sampler(buckets, cfg, rank: int, world: int, log=None) -> BucketBatchSampler:
    """This process's batches of `buckets` (one clip's bucket each); refuses a batch size that makes none (the
    loop would wait forever for its first batch) and, given `log`, says which clips no batch will hold."""
    sampler = BucketBatchSampler(list(buckets), cfg.data.batch_size, cfg.seed, rank, world)
    if len(sampler) == 0:
        largest = max(Counter(buckets).values())
        raise UserInputError(
            f"data.batch_size={cfg.data.batch_size} makes no full batch for {world} process(es): the largest "
            f"bucket of {cfg.data.dataset} holds {largest} usable clip(s), and a batch takes clips of one bucket "
            "(a bucket's last partial batch is dropped). Lower data.batch_size, or add clips"
        )
    unused = unused_clips(list(buckets), cfg.data.batch_size, world).line(
        cfg.data.batch_size, world, fix="lower data.batch_size"
    )
    if unused and log:
        log(f"note: {unused}")
    return sampler
