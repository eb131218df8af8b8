"""HappyHorse-1.0 behind the generic boundary."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from happyhorse_train.files import write_atomic
from happyhorse_train.models.happyhorse import load_pipeline
from happyhorse_train.models.happyhorse.clip_encoder import HappyHorseClipEncoder
from happyhorse_train.models.happyhorse.lora import LORA_WEIGHT_NAME
from happyhorse_train.models.spec import ModelSpec, register_backbone


@register_backbone
class HappyHorseSpec(ModelSpec):
    name = "happyhorse"
    # Every attention projection (incl. the per-head gate) and the SwiGLU MLP, in shared and sandwich blocks.
    default_lora_targets = ["to_q", "to_k", "to_v", "to_gate", "to_out", "gate_proj", "up_proj", "down_proj"]

    def load_pipeline(self, path, device, dtype):
        return load_pipeline(path, device, dtype)

    def clip_encoder(self, pipe, path, max_sequence_length):
        return HappyHorseClipEncoder(pipe, path, max_sequence_length)

    def normalize_latents(self, pipe, latents):
        return pipe.normalize_latents(latents)

    def predict_velocity(self, transformer, noisy_latents, timesteps, text_states, text_mask):
        return transformer(
            noisy_latents, encoder_hidden_states=text_states, timestep=timesteps,
            encoder_attention_mask=text_mask, return_dict=False,
        )[0]

    def num_tokens(self, transformer, latent_shape):
        t, h, w = transformer.latent_grid(latent_shape)
        return t * h * w

    def save_lora(self, path, lora_state_dict, adapter_metadata, extra_metadata):
        # The diffusers layout: "transformer."-prefixed peft keys, adapter config under "lora_adapter_metadata".
        tensors = {f"transformer.{key}": value.detach().contiguous().cpu() for key, value in lora_state_dict.items()}
        packed = {f"transformer.{key}": value for key, value in adapter_metadata.items()}
        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True, default=list)}
        metadata.update({key: json.dumps(value, sort_keys=True, default=str) for key, value in extra_metadata.items()})
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(path / LORA_WEIGHT_NAME, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
