"""One batch's flow-matching loss: what a training step computes before the backward.

Every sample draws its randomness (the latent sample from the cached posterior, the noise level, the noise,
caption dropout) from its own generator, seeded by (seed, optimizer step, micro-batch, clip). A sample's
randomness therefore does not depend on which process or batch position it lands in: N processes with batch b
train exactly as one process with batch N*b, and a resumed run needs no generator state.

The generators live on the host, and everything decided by a random draw (which captions drop, how long the
text is) is settled there before the batch moves to the device: the step never waits on the GPU to branch, and
the same seed draws the same noise on any device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from happyhorse_train.data.dataset import pad_text_states
from happyhorse_train.training import flow_matching as fm


def sample_generator(seed: int, step: int, micro_batch: int, clip_id: str) -> torch.Generator:
    return keyed_generator(seed, step, micro_batch, clip_id)


def keyed_generator(*key: object) -> torch.Generator:
    """A host generator seeded by a hash of `key`: the same key draws the same values in any process."""
    digest = hashlib.sha256(",".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass(frozen=True)
class StepContext:
    """What a training step runs a batch through, fixed for the run: the backbone's forward on the prepared
    model, the noise recipe (the `flow` config group) and caption dropout toward the cached empty caption."""

    spec: object  # the ModelSpec
    pipe: object
    model: torch.nn.Module  # as accelerate prepared it
    device: torch.device
    compute_dtype: torch.dtype
    flow: object
    caption_dropout: float
    empty_text: torch.Tensor


class BatchLoss(NamedTuple):
    loss: torch.Tensor  # what the backward takes: weighted by flow.loss_weighting
    unweighted: torch.Tensor  # the plain mean squared velocity error, comparable across weightings (detached)
    tokens: int  # video tokens in the batch


def batch_loss(batch: dict, generators: list[torch.Generator], ctx: StepContext) -> BatchLoss:
    """The batch's training loss. `batch` is on the host, as the loader yields it; `generators` has one host
    generator per sample, in batch order."""
    sample_shape, flow = batch["latent_mean"].shape[1:], ctx.flow

    def draw(fn):
        return torch.stack([fn(g) for g in generators])

    posterior = draw(lambda g: torch.randn(sample_shape, generator=g))
    sigmas = draw(lambda g: fm.sample_sigmas(
        1, flow.sigma_sampling, g, logit_mean=flow.logit_mean, logit_std=flow.logit_std, mode_scale=flow.mode_scale,
    )[0])
    noise = draw(lambda g: torch.randn(sample_shape, generator=g))
    dropped = draw(lambda g: torch.rand((), generator=g)) < ctx.caption_dropout

    text, mask = batch["text_states"], batch["text_mask"]
    if ctx.caption_dropout > 0:
        text, mask = drop_captions(text, mask, ctx.empty_text, dropped)
    errors, sigmas, tokens = velocity_errors(batch, posterior, sigmas, noise, (text, mask), ctx, shifted=True)
    weights = fm.loss_weights(sigmas, flow.loss_weighting)
    return BatchLoss(fm.weighted_mean(errors, weights), errors.detach().mean(), tokens)


def velocity_errors(batch, posterior, sigmas, noise, text_and_mask, ctx: StepContext, shifted: bool):
    """Per-sample mean squared error of the predicted velocity, the sigmas used and the batch's video tokens.

    Host tensors in, one per sample: `posterior` draws the latent from the cached mean and std, `sigmas` are the
    noise levels (shifted here by the training shift when `shifted`), `noise` the noise mixed in.
    """
    text, mask = text_and_mask
    if mask.all():
        mask = None  # nothing padded: attention without a mask, which every fast kernel takes

    def to_device(tensor):  # without a stream sync: the copies queue behind the previous step's kernels
        return None if tensor is None else tensor.to(ctx.device, non_blocking=True)

    text, mask, noise, sigmas = to_device(text), to_device(mask), to_device(noise), to_device(sigmas)
    mean, std = to_device(batch["latent_mean"]), to_device(batch["latent_std"])
    latents = ctx.spec.normalize_latents(ctx.pipe, mean + std * to_device(posterior))
    tokens = ctx.spec.num_tokens(ctx.pipe.transformer, tuple(latents.shape))
    if shifted:
        sigmas = fm.shift_sigmas(sigmas, training_shift(ctx.flow, tokens))
    cached = {name: to_device(tensor) for name, tensor in batch.get("condition", {}).items()}
    conditioned = ctx.spec.conditioned_input(ctx.pipe.transformer, fm.noisy_latents(latents, noise, sigmas), cached)
    # Autocast here rather than accelerate's: under DeepSpeed accelerate turns its own off, and a bf16
    # DeepSpeed model would then meet float32 inputs.
    dtype = ctx.compute_dtype
    with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype != torch.float32):
        prediction = ctx.spec.predict_velocity(
            ctx.model, conditioned.latents, fm.timesteps_from_sigmas(sigmas), text, mask, **conditioned.inputs
        )
    loss_mask = to_device(batch.get("loss_mask"))
    if conditioned.loss_mask is not None:  # what the model is given (an image-to-video first frame) is not predicted
        loss_mask = conditioned.loss_mask if loss_mask is None else loss_mask * conditioned.loss_mask
    errors = fm.squared_errors(prediction, fm.velocity_target(latents, noise), loss_mask)
    return errors, sigmas, tokens * latents.shape[0]


def training_shift(flow, tokens_per_sample: int) -> float:
    """The sigma shift training uses for samples of `tokens_per_sample` video tokens (the `flow` config group)."""
    if not flow.resolution_shift:
        return flow.shift
    return fm.resolution_shift(tokens_per_sample, flow.base_shift, flow.max_shift, flow.base_tokens, flow.max_tokens)


def drop_captions(text, mask, empty_text, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Host tensors: each sample's real caption tokens, or the empty caption's where `dropped` (for
    classifier-free guidance), right-padded to the longest with a mask of real tokens."""
    rows = [empty_text if drop else states[real] for states, real, drop in zip(text, mask, dropped.tolist())]
    return pad_text_states([row.to(text.dtype) for row in rows])
