"""Video request -> latent geometry, for any pipeline with a Wan-style VAE and a patchifying transformer."""

from __future__ import annotations

from happyhorse_train.errors import UserInputError


def video_latent_shape(pipe, height: int, width: int, num_frames: int) -> tuple[int, int, int, int]:
    """(channels, frames, height, width) of the latent for a request; a UserInputError naming the nearest
    valid values when a size does not fit (nothing is rounded silently).

    Reads `pipe.vae_scale_factor_spatial`, `pipe.vae_scale_factor_temporal` and the transformer's
    `patch_size` and `out_channels` config (the latent's channels: an image-to-video Wan reads more), which
    HappyHorsePipeline and diffusers' Wan pipelines all have.
    """
    spatial = pipe.vae_scale_factor_spatial
    temporal = pipe.vae_scale_factor_temporal
    _, patch_h, patch_w = pipe.transformer.config.patch_size
    for name, size, patch in (("height", height, patch_h), ("width", width, patch_w)):
        if size <= 0 or size % (spatial * patch):
            multiple = spatial * patch
            lower, upper = max(size // multiple * multiple, multiple), (size // multiple + 1) * multiple
            raise UserInputError(
                f"{name}={size} does not fit the model: it must be a multiple of {multiple} "
                f"(VAE {spatial}x times patch {patch}); try {lower} or {upper}"
            )
    if num_frames < 1 or (num_frames - 1) % temporal:
        lower = max((num_frames - 1) // temporal * temporal + 1, 1)
        raise UserInputError(
            f"num_frames={num_frames} is not of the form {temporal}k+1 (the VAE compresses time {temporal}x); "
            f"try {lower} or {lower + temporal}"
        )
    channels = pipe.transformer.config.out_channels
    return channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial
