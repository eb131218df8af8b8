"""One batch's flow-matching loss: what a training step computes before the backward.

Every sample draws its randomness (the latent sample from the cached posterior, the noise level, the noise,
caption dropout) from its own generator, seeded by (seed, optimizer step, micro-batch, clip). A sample's
randomness therefore does not depend on which process or batch position it lands in: N processes with batch b
train exactly as one process with batch N*b, and a resumed run needs no generator state.
"""

from __future__ import annotations

import hashlib

import torch

from happyhorse_train.training import flow_matching as fm


def sample_generator(seed: int, step: int, micro_batch: int, clip_id: str, device: torch.device) -> torch.Generator:
    key = hashlib.sha256(f"{seed},{step},{micro_batch},{clip_id}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(key[:8], "little") >> 1)


def flow_matching_loss(
    batch: dict, generators: list[torch.Generator], cfg, spec, pipe, model, empty_text: torch.Tensor,
    device: torch.device, compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, int]:
    """The batch's loss and its video-token count. `generators` has one generator per sample, in batch order."""
    mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
    sample_shape = mean.shape[1:]
    flow = cfg.flow

    def draw(fn):
        return torch.stack([fn(g) for g in generators])

    posterior = draw(lambda g: torch.randn(sample_shape, generator=g, device=device))
    sigmas = draw(lambda g: fm.sample_sigmas(
        1, flow.sigma_sampling, g, device=device,
        logit_mean=flow.logit_mean, logit_std=flow.logit_std, mode_scale=flow.mode_scale,
    )[0])
    noise = draw(lambda g: torch.randn(sample_shape, generator=g, device=device))
    dropped = draw(lambda g: torch.rand((), generator=g, device=device)) < cfg.data.caption_dropout

    latents = spec.normalize_latents(pipe, mean + std * posterior)
    text, mask = batch["text_states"].to(device), batch["text_mask"].to(device)
    if cfg.data.caption_dropout > 0:
        text, mask = drop_captions(text, mask, empty_text.to(device), dropped)
    tokens = spec.num_tokens(pipe.transformer, tuple(latents.shape))
    shift = fm.resolution_shift(tokens, flow.base_shift, flow.max_shift, flow.base_tokens, flow.max_tokens) if flow.resolution_shift else flow.shift
    sigmas = fm.shift_sigmas(sigmas, shift)
    noisy = fm.noisy_latents(latents, noise, sigmas)
    # Autocast here rather than accelerate's: under DeepSpeed accelerate turns its own off, and a bf16
    # DeepSpeed model would then meet float32 inputs.
    with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
        prediction = spec.predict_velocity(model, noisy, fm.timesteps_from_sigmas(sigmas), text, mask)
    loss = fm.flow_matching_loss(prediction, fm.velocity_target(latents, noise), fm.loss_weights(sigmas, flow.loss_weighting))
    return loss, tokens * latents.shape[0]


def drop_captions(text, mask, empty_text, dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the captions where `dropped` is True with the empty caption's states (for classifier-free guidance).
    No branch on `dropped`'s values: reading them would stall the GPU queue every step."""
    length = max(text.shape[1], empty_text.shape[0])
    padded_text = torch.zeros(text.shape[0], length, text.shape[2], dtype=text.dtype, device=text.device)
    padded_mask = torch.zeros(text.shape[0], length, dtype=torch.bool, device=text.device)
    padded_text[:, : text.shape[1]], padded_mask[:, : mask.shape[1]] = text, mask
    empty_mask = torch.arange(length, device=text.device) < empty_text.shape[0]
    empty = torch.zeros(length, text.shape[2], dtype=text.dtype, device=text.device)
    empty[: empty_text.shape[0]] = empty_text.to(text.dtype)
    padded_text[dropped], padded_mask[dropped] = empty, empty_mask
    return padded_text, padded_mask
