"""HappyHorsePipeline: text-to-video (and, for a transformer with `image_conditioning="first_frame"`,
image-to-video) sampling with classifier-free guidance, the one users and validation run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from happyhorse_train.errors import UserInputError
from happyhorse_train.models.geometry import video_latent_shape
from happyhorse_train.models.happyhorse.lora import HappyHorseLoraLoaderMixin
from happyhorse_train.models.happyhorse.transformer import HappyHorseTransformer3DModel
from happyhorse_train.models.latent_space import denormalize_latents, mode_latents


def with_first_frame(latents: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) latents whose first latent frame is `first` (B or 1, C, 1, H, W): the image condition."""
    return torch.cat([first.expand(latents.shape[0], -1, -1, -1, -1).to(latents.dtype), latents[:, :, 1:]], dim=2)


@dataclass
class HappyHorsePipelineOutput(BaseOutput):
    """`frames`: (batch, frames, height, width, 3) floats in [0, 1] for "np", a tensor for "pt",
    lists of PIL images for "pil", normalized latents for "latent"."""

    frames: np.ndarray | torch.Tensor | list


class HappyHorsePipeline(DiffusionPipeline, HappyHorseLoraLoaderMixin):
    """Text to video. Components are used as given: `from_pretrained` returns them in eval mode; a caller
    that passes live training modules (validation) switches them to eval first, or dropout stays on."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer: HappyHorseTransformer3DModel,
        vae: AutoencoderKLWan,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # --- geometry -------------------------------------------------------------------------------

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) of the latent for a video request; raises on sizes that do not fit."""
        return video_latent_shape(self, height, width, num_frames)

    # --- conditioning ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(
        self, prompts: list[str], max_sequence_length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-encoder states (batch, tokens, text_dim) padded to the longest prompt, and their mask."""
        tokens = self.tokenizer(
            prompts, padding="longest", truncation=True, max_length=max_sequence_length, return_tensors="pt"
        )
        input_ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        states = self.text_encoder(input_ids, attention_mask=mask).last_hidden_state
        states = states * mask.unsqueeze(-1).to(states.dtype)  # padded positions carry nothing
        return states.to(self.transformer.dtype), mask

    def encode_image(self, image, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The condition image (PIL, or an array diffusers' image processor takes) as a normalized (1, C, 1, h, w)
        latent: resized to cover height x width and centre-cropped, then encoded as a one-frame video."""
        pixels = self.video_processor.preprocess(image, height=height, width=width, resize_mode="crop")
        return mode_latents(self.vae, pixels[:, :, None].to(device))

    def _check_image(self, image) -> None:
        conditioning = self.transformer.config.get("image_conditioning")
        if conditioning is None and image is not None:
            raise UserInputError("image= given, but this is a text-to-video model (its transformer has no "
                                 "image_conditioning): leave image out, or load an image-to-video model")
        if conditioning is not None and image is None:
            raise UserInputError(f"this is an image-to-video model (image_conditioning={conditioning!r}): give "
                                 "image= (the first frame)")

    # --- latents <-> pixels ---------------------------------------------------------------------

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents -> video (batch, 3, frames, height, width) in [-1, 1]."""
        return self.vae.decode(denormalize_latents(self.vae, latents).to(self.vae.dtype), return_dict=False)[0]

    # --- sampling -------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 720,
        num_frames: int = 121,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        max_sequence_length: int = 512,
        image=None,
    ) -> HappyHorsePipelineOutput | tuple:
        if output_type not in ("np", "pt", "pil", "latent"):
            raise UserInputError(f"output_type={output_type!r}; use one of np, pt, pil, latent")
        if num_inference_steps < 1:
            raise UserInputError(f"num_inference_steps={num_inference_steps}; it must be at least 1")
        self._check_image(image)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
        if len(negatives) != len(prompts):
            raise UserInputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        prompts = [p for p in prompts for _ in range(num_videos_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_videos_per_prompt)]
        latent_shape = self.latent_shape(height, width, num_frames)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        # With guidance, conditional and unconditional halves run as one batch: one transformer call per step.
        texts = prompts + negatives if do_cfg else prompts
        text_states, text_mask = self.encode_prompt(texts, max_sequence_length, device)
        if bool(text_mask.all()):  # nothing padded (one read, before the loop): attention runs without a mask
            text_mask = None

        if latents is None:
            shape = (len(prompts), *latent_shape)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)
        first = None if image is None else self.encode_image(image, height, width, device)
        if first is not None:  # the image stands as the clean first frame throughout, as in training
            latents = with_first_frame(latents, first)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        with self.progress_bar(total=num_inference_steps) as progress:
            for t in self.scheduler.timesteps:
                model_input = torch.cat([latents, latents]) if do_cfg else latents
                velocity = self.transformer(
                    model_input.to(self.transformer.dtype),
                    encoder_hidden_states=text_states,
                    timestep=t.expand(model_input.shape[0]),
                    encoder_attention_mask=text_mask,
                    return_dict=False,
                )[0].float()
                if do_cfg:
                    conditional, unconditional = velocity.chunk(2)
                    velocity = unconditional + guidance_scale * (conditional - unconditional)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                if first is not None:
                    latents = with_first_frame(latents, first)
                progress.update()

        if output_type == "latent":
            frames = latents
        else:
            frames = self.video_processor.postprocess_video(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return HappyHorsePipelineOutput(frames=frames)
