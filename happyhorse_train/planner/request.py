"""What the user asks the planner: the request, and the clip size parsed and checked against the model."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from happyhorse_train.errors import UserInputError
from happyhorse_train.models.geometry import video_latent_shape
from happyhorse_train.planner.assumptions import ACHIEVED_FLOPS, PCIE_BYTES_PER_S, VAE_FACTORS_BY_LATENT_CHANNELS


@dataclass(frozen=True)
class PlanRequest:
    preset: str  # a configs/model/*.yaml name, or a path to one
    gpu_memory_gib: float  # per GPU
    host_ram_gib: float  # of the machine (all training processes share it)
    width: int
    height: int
    frames: int
    num_gpus: int = 1
    batch_size: int = 1  # per GPU
    lora_rank: int | None = 32  # None: full fine-tune
    text_tokens: int | None = None  # prompt tokens per sample; None: the preset's sample.max_sequence_length
    encoders_in_host_ram: bool = True  # the text encoder and VAE stay in host RAM after caching (for validation)
    tflops: float = ACHIEVED_FLOPS / 1e12
    pcie_gbps: float = PCIE_BYTES_PER_S / 1e9

    @property
    def mode(self) -> str:
        return "full" if self.lora_rank is None else "lora"


def parse_size(text: str) -> tuple[int, int, int]:
    """'720x480x121' -> (width, height, frames)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserInputError(f"size {text!r} is not WIDTHxHEIGHTxFRAMES with positive integers, e.g. 720x480x121")
    width, height, frames = (int(p) for p in parts)
    return width, height, frames


def latent_shape(preset: dict, width: int, height: int, frames: int) -> tuple[int, int, int, int]:
    """(channels, frames, height, width) of one clip's latent; a UserInputError naming valid sizes otherwise."""
    transformer = preset["transformer"]
    vae = preset.get("vae") or {}
    channels = transformer.get("out_channels", 16)  # the latent's (an image-to-video Wan reads more)
    spatial, temporal = VAE_FACTORS_BY_LATENT_CHANNELS.get(channels, (8, 4))
    # The geometry check reads these pipeline attributes; the planner has no pipeline, only the preset.
    pipe_like = SimpleNamespace(
        vae_scale_factor_spatial=vae.get("scale_factor_spatial", spatial),
        vae_scale_factor_temporal=vae.get("scale_factor_temporal", temporal),
        transformer=SimpleNamespace(
            config=SimpleNamespace(patch_size=transformer["patch_size"], out_channels=channels)
        ),
    )
    return video_latent_shape(pipe_like, height, width, frames)
