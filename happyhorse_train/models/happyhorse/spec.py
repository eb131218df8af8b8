"""HappyHorse-1.0 behind the generic boundary."""

from __future__ import annotations

from happyhorse_train.models.clip_encoder import FIRST_FRAME
from happyhorse_train.models.happyhorse.clip_encoder import HappyHorseClipEncoder
from happyhorse_train.models.happyhorse.pipeline import HappyHorsePipeline, with_first_frame
from happyhorse_train.models.happyhorse.transformer import HappyHorseTransformer3DModel
from happyhorse_train.models.spec import Conditioned, ModelSpec, first_frame_loss_mask


class HappyHorseSpec(ModelSpec):
    name = "happyhorse"
    pipeline_class = HappyHorsePipeline
    transformer_class = HappyHorseTransformer3DModel
    # Every attention projection (incl. the per-head gate) and the SwiGLU MLP, in shared and sandwich blocks
    # (less the last block's dead text layers: unreachable_modules).
    default_lora_targets = ["to_q", "to_k", "to_v", "to_gate", "to_out", "gate_proj", "up_proj", "down_proj"]
    feed_forward_classes = ("SwiGLU",)

    def unreachable_modules(self, transformer):
        # Only video tokens leave the last block; its text tokens reach them only as attention keys and values.
        last = len(transformer.blocks) - 1
        if not transformer.blocks[last].modality_specific:
            return []
        dead = ("attn.to_q", "attn.to_gate", "attn.to_out", "ff.gate_proj", "ff.up_proj", "ff.down_proj")
        return [f"blocks.{last}.text.{name}" for name in dead]

    def image_conditioning(self, transformer):
        return transformer.config.get("image_conditioning")

    def conditioned_input(self, transformer, noisy, cached):
        if self.image_conditioning(transformer) != FIRST_FRAME:
            return Conditioned(noisy, None, {})
        # The cached image latent stands as latent frame 0, as in the pipeline; the loss leaves that frame out,
        # since it is given, not predicted.
        return Conditioned(with_first_frame(noisy, cached["first_latents"]), first_frame_loss_mask(noisy), {})

    def clip_encoder(self, pipe, path):
        return HappyHorseClipEncoder(pipe, path, self.max_sequence_length, self.image_conditioning(pipe.transformer))

    def predict_velocity(self, transformer, noisy_latents, timesteps, text_states, text_mask):
        return transformer(
            noisy_latents, encoder_hidden_states=text_states, timestep=timesteps,
            encoder_attention_mask=text_mask, return_dict=False,
        )[0]
