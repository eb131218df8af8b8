"""diffusers' Wan 2.1 / 2.2 text-to-video models behind the generic boundary.

The classes are diffusers' own (WanTransformer3DModel, AutoencoderKLWan, UMT5, WanPipeline), so a LoRA
trained here is checked by an outside client: diffusers' `WanPipeline.load_lora_weights`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import WanPipeline, WanTransformer3DModel

from happyhorse_train.models.clip_encoder import VaeClipEncoder
from happyhorse_train.models.spec import ModelSpec


class WanClipEncoder(VaeClipEncoder):
    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        # The pipeline's own prompt path (its text cleaning included), then its zero padding trimmed off:
        # WanPipeline zeroes every row past a prompt's tokens, and a real token's state is never all zeros.
        states, _ = self.pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            device=self.pipe.text_encoder.device,
        )
        trimmed = []
        for state in states:
            nonzero = state.abs().sum(-1).nonzero()
            length = int(nonzero[-1]) + 1 if len(nonzero) else 0
            trimmed.append({"text": state[:length].float()})
        return trimmed


class WanSpec(ModelSpec):
    name = "wan"
    pipeline_class = WanPipeline
    transformer_class = WanTransformer3DModel
    # Self- and cross-attention projections and the feed-forward, as diffusers names them in Wan blocks.
    default_lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    feed_forward_classes = ("FeedForward",)

    # diffusers' names -> the original Wan code's, which ComfyUI uses (the inverse of diffusers' own
    # _convert_non_diffusers_wan_lora_to_diffusers).
    comfyui_renames = [
        ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
        ("attn1.to_out.0", "self_attn.o"), ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"),
        ("attn2.to_v", "cross_attn.v"), ("attn2.to_out.0", "cross_attn.o"), ("attn2.add_k_proj", "cross_attn.k_img"),
        ("attn2.add_v_proj", "cross_attn.v_img"), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
        ("condition_embedder.time_proj", "time_projection.1"), ("proj_out", "head.head"),
        ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
        ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
        ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
        ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ]
    # diffusers' converter of that layout reads alpha keys only inside the blocks (one elsewhere is left over,
    # and refused); ComfyUI reads a layer without one at scale 1, so both take these with the scale folded in.
    comfyui_alpha_free = ("proj_out", "condition_embedder")
    default_lora_formats = ("diffusers", "comfyui")
    pipeline_converts_lora_layouts = True

    def clip_encoder(self, pipe, path):
        return WanClipEncoder(pipe, path, self.max_sequence_length)

    def predict_velocity(self, transformer, noisy_latents, timesteps, text_states, text_mask, **image):
        # WanPipeline feeds prompts zero-padded to max_sequence_length with no mask, and cross-attention
        # does attend to the zero rows: training must see exactly that, or inference drifts from it.
        text = text_states if text_mask is None else text_states * text_mask.unsqueeze(-1).to(text_states.dtype)
        text = text[:, : self.max_sequence_length]
        text = F.pad(text, (0, 0, 0, self.max_sequence_length - text.shape[1]))
        return transformer(
            hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=text, return_dict=False, **image
        )[0]
