"""diffusers' WanImageToVideoPipeline behind the generic boundary, in the two ways diffusers conditions on the image.

- Wan 2.1 I2V (`first_frame_on_channels`): the transformer takes 2 x z_dim + 4 channels: the noisy latents, a
  4-channel mask marking latent frame 0 as given, and the VAE latents of the image followed by black frames; the
  CLIP image encoder's penultimate states enter cross-attention beside the text (k_img / v_img).
- Wan 2.2 TI2V (`first_frame`): in_channels = out_channels; the image's latent stands clean as latent frame 0
  and its tokens get timestep 0 (the pipeline's `expand_timesteps`).

Training builds the transformer's input from the same parts, cached per clip by `WanImageClipEncoder`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from happyhorse_train.errors import UserInputError
from happyhorse_train.models.clip_encoder import FIRST_FRAME, condition_image
from happyhorse_train.models.component_id import component_id
from happyhorse_train.models.spec import Conditioned, first_frame_loss_mask
from happyhorse_train.models.wan.text_to_video import WanClipEncoder, WanSpec


def _quietly_imported_pipeline() -> type:
    # Importing the pipeline makes transformers warn that, without torchvision, CLIPImageProcessor falls back to
    # its PIL version: the one this toolkit uses anyway (torchvision is not one of its dependencies).
    warner = logging.getLogger("transformers.utils.import_utils")
    level = warner.level
    warner.setLevel(logging.ERROR)
    try:
        from diffusers import WanImageToVideoPipeline
    finally:
        warner.setLevel(level)
    return WanImageToVideoPipeline


ON_CHANNELS = "first_frame_on_channels"
# diffusers' WanAttnProcessor takes all but the last 512 context tokens as the image's.
TEXT_TOKENS_WITH_IMAGE = 512


def conditioning_of(config) -> str:
    """The way a Wan transformer config takes its image: on channels when it reads more than it writes."""
    return ON_CHANNELS if config["in_channels"] > config["out_channels"] else FIRST_FRAME


def image_pixels(pixels: torch.Tensor) -> Image.Image:
    """A (3, H, W) frame in [-1, 1] as the 8-bit RGB image a user would hand the pipeline."""
    array = ((pixels.float().permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


class WanImageClipEncoder(WanClipEncoder):
    """A clip's latents and what the pipeline makes of its condition image (its first-frame image, else its frame
    0): `first_frame` the image's own latents ("first_latents"); `first_frame_on_channels` "image_latents" (the
    normalized VAE mode of the image followed by black frames, as `WanImageToVideoPipeline.prepare_latents`
    encodes it); and "image_embeds" (the CLIP image encoder's penultimate states) for a transformer that takes
    them (`image_dim`), as the pipeline decides."""

    def __init__(self, pipe, model_folder, max_sequence_length: int, conditioning: str):
        super().__init__(pipe, model_folder, max_sequence_length, conditioning)
        self.takes_embeds = pipe.transformer.config.image_dim is not None
        if self.takes_embeds:
            folder = Path(model_folder)
            self.video_id += f":{component_id(folder / 'image_encoder')}:{component_id(folder / 'image_processor')}"

    @torch.no_grad()
    def encode_video(self, pixels, first_frame=None):
        entry = super().encode_video(pixels, first_frame)
        image = condition_image(pixels, first_frame)
        if self.conditioning == ON_CHANNELS:
            first_then_black = torch.cat([image[:, None], torch.zeros_like(pixels[:, 1:])], dim=1)
            entry["image_latents"] = self.condition_latents(first_then_black)[0]
        if self.takes_embeds:
            embeds = self.pipe.encode_image(image_pixels(image), self.pipe.image_encoder.device)
            entry["image_embeds"] = embeds[0].float()
        return entry


class WanImageSpec(WanSpec):
    name = "wan-i2v"
    pipeline_class = _quietly_imported_pipeline()
    float32_components = ("vae", "image_encoder")  # the CLIP encoder in float32, as diffusers' examples load it
    # Beside the text-to-video targets: the image cross-attention's key and value (ComfyUI's k_img, v_img).
    default_lora_targets = [*WanSpec.default_lora_targets, "add_k_proj", "add_v_proj"]
    comfyui_renames = [
        *WanSpec.comfyui_renames,
        ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
        ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ]

    def load_pipeline(self, path, device, dtype, transformer=None, transformer_to_device=True):
        self.check_image_parts(Path(path).expanduser())
        return super().load_pipeline(path, device, dtype, transformer, transformer_to_device)

    def check_image_parts(self, folder: Path) -> None:
        """One line, before anything loads, when the folder's parts disagree on how the image enters."""
        try:
            config = json.loads((folder / "transformer" / "config.json").read_text())
            index = json.loads((folder / "model_index.json").read_text())
        except (OSError, json.JSONDecodeError):
            return  # check_model_folder names what is missing or broken
        conditioning, expand = conditioning_of(config), bool(index.get("expand_timesteps"))
        if expand != (conditioning == FIRST_FRAME):
            raise UserInputError(
                f"{folder}: model_index.json has expand_timesteps={expand}, but the transformer takes the image "
                f"{conditioning} (in_channels {config['in_channels']}, out_channels {config['out_channels']}): set "
                f"expand_timesteps to {not expand} (true for Wan 2.2 TI2V, false for Wan 2.1 I2V)")
        if index.get("boundary_ratio") is not None:
            raise UserInputError(f"{folder}: a two-expert Wan 2.2 model (boundary_ratio) does not train here yet")
        missing = [name for name in ("image_encoder", "image_processor") if not (folder / name).is_dir()]
        if config.get("image_dim") is not None and missing:
            raise UserInputError(f"{folder}: the transformer takes CLIP image embeddings (image_dim "
                                 f"{config['image_dim']}), but there is no {' or '.join(missing)} subfolder")
        if config.get("added_kv_proj_dim") is not None and self.max_sequence_length != TEXT_TOKENS_WITH_IMAGE:
            raise UserInputError(
                f"this Wan image-to-video model reads prompts as exactly {TEXT_TOKENS_WITH_IMAGE} tokens (diffusers "
                f"splits image from text there), not {self.max_sequence_length}: set "
                f"model.sample.max_sequence_length={TEXT_TOKENS_WITH_IMAGE}")

    def image_conditioning(self, transformer):
        return conditioning_of(transformer.config)

    def clip_encoder(self, pipe, path):
        return WanImageClipEncoder(pipe, path, self.max_sequence_length, self.image_conditioning(pipe.transformer))

    def conditioned_input(self, transformer, noisy, cached):
        inputs = {"image_embeds": cached["image_embeds"]} if "image_embeds" in cached else {}
        if self.image_conditioning(transformer) == FIRST_FRAME:
            # As the pipeline: latent frame 0 clean, its tokens at timestep 0, and nothing there to predict.
            kept = first_frame_loss_mask(noisy)
            pt, ph, pw = transformer.config.patch_size
            token_timesteps = kept[:, 0, ::pt, ::ph, ::pw].flatten(1)
            latents = (1 - kept) * cached["first_latents"].to(noisy.dtype) + kept * noisy
            return Conditioned(latents, kept, {**inputs, "token_timesteps": token_timesteps})
        # The 4 mask channels say which latent frames the image latents hold (frame 0's four pixel frames).
        config = transformer.config
        batch, _, frames, height, width = noisy.shape
        given = noisy.new_zeros(batch, config.in_channels - 2 * config.out_channels, frames, height, width)
        given[:, :, 0] = 1
        latents = torch.cat([noisy, given, cached["image_latents"].to(noisy.dtype)], dim=1)
        return Conditioned(latents, None, inputs)

    def predict_velocity(self, transformer, noisy_latents, timesteps, text_states, text_mask, image_embeds=None,
                         token_timesteps=None):
        if token_timesteps is not None:
            timesteps = token_timesteps * timesteps[:, None]
        image = {} if image_embeds is None else {"encoder_hidden_states_image": image_embeds}
        return super().predict_velocity(transformer, noisy_latents, timesteps, text_states, text_mask, **image)
