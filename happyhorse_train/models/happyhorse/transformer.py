"""HappyHorse-1.0 transformer: a single-stream text-to-video diffusion transformer.

Text tokens and 1x2x2-patchified video latent tokens share ONE self-attention sequence (no
cross-attention), text first. The first and last `sandwich_layers` blocks keep separate weights for
the two modalities; the blocks between share theirs. Attention uses grouped-query heads, QK RMSNorm,
3D RoPE and a per-head sigmoid gate on its output. Every block is modulated by the timestep
(adaLN: shift, scale and gate for attention and for the SwiGLU MLP).

No official weights or code are public; this follows the publicly reported design (docs/model.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from happyhorse_train.models.attention import attention
from happyhorse_train.models.fused_linear import fused_linears


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (batch,) timesteps on the 0..1000 scale, as (batch, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class RotaryEmbedding3D(nn.Module):
    """RoPE over (t, h, w). Each axis rotates its own slice of the head dimension.

    Video token positions are its latent-grid coordinates (all >= 0). Text token i sits at
    (-1-i, -1-i, -1-i): never equal to a video position, and independent of how far the batch's text
    is padded, so a prompt's encoding does not change with its neighbours in the batch.
    """

    def __init__(self, axes_dim: tuple[int, int, int], theta: float):
        super().__init__()
        self.axes_dim = tuple(axes_dim)
        self.theta = theta

    def _axis_angles(self, positions: torch.Tensor, axis_dim: int) -> torch.Tensor:
        freqs = self.theta ** (-torch.arange(0, axis_dim, 2, device=positions.device, dtype=torch.float32) / axis_dim)
        return positions.float()[:, None] * freqs[None]

    def forward(
        self, num_text_tokens: int, grid: tuple[int, int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t, h, w = grid
        tt, hh, ww = torch.meshgrid(*(torch.arange(n, device=device) for n in (t, h, w)), indexing="ij")
        text_pos = -1 - torch.arange(num_text_tokens, device=device)
        positions = [torch.cat([text_pos, axis.flatten()]) for axis in (tt, hh, ww)]
        angles = torch.cat([self._axis_angles(p, d) for p, d in zip(positions, self.axes_dim)], dim=-1)
        return angles.cos(), angles.sin()  # each (tokens, head_dim / 2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (batch, heads, tokens, head_dim) by the given angles, in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs.unbind(-1)
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class GatedAttentionProjections(nn.Module):
    """The per-modality weights around joint attention: Q/K/V (grouped), QK-norm, output gate, output."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.to_q = nn.Linear(dim, num_heads * head_dim)
        self.to_k = nn.Linear(dim, num_kv_heads * head_dim)
        self.to_v = nn.Linear(dim, num_kv_heads * head_dim)
        self.to_gate = nn.Linear(dim, num_heads)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.Linear(num_heads * head_dim, dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, tokens, dim) -> q, k, v as (batch, heads, tokens, head_dim) and gate (batch, tokens, heads)."""
        q, k, v, gate = fused_linears(x, [self.to_q, self.to_k, self.to_v, self.to_gate])
        q = self.norm_q(q.unflatten(-1, (self.num_heads, self.head_dim))).transpose(1, 2)
        k = self.norm_k(k.unflatten(-1, (self.num_kv_heads, self.head_dim))).transpose(1, 2)
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        return q, k, v, gate

    def output(self, attended: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """attended (batch, heads, tokens, head_dim), gate (batch, tokens, heads) -> (batch, tokens, dim)."""
        gated = attended.transpose(1, 2) * torch.sigmoid(gate).unsqueeze(-1).to(attended.dtype)
        return self.to_out(gated.flatten(2))


class SwiGLU(nn.Module):
    # gate_proj and up_proj read the same input but are not fused (models/fused_linear.py): the fused output and
    # its gradient would be one tokens x 2*ffn_dim tensor (2.4 GB at the 8b's 42k tokens), doubling the largest
    # tensor of the backward to save one gradient addition.
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim)
        self.up_proj = nn.Linear(dim, hidden_dim)
        self.down_proj = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TokenStreamLayers(nn.Module):
    """Everything in a block that acts on tokens one by one: norms, attention projections, MLP."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, ffn_dim: int, eps: float):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=eps, elementwise_affine=False)
        self.attn = GatedAttentionProjections(dim, num_heads, num_kv_heads, head_dim, eps)
        self.norm2 = nn.RMSNorm(dim, eps=eps, elementwise_affine=False)
        self.ff = SwiGLU(dim, ffn_dim)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class HappyHorseBlock(nn.Module):
    """One transformer block over the joint [text; video] sequence.

    A modality-specific ("sandwich") block routes text tokens through `text` and video tokens through
    `video`; a shared block routes all tokens through `shared`. Attention is always joint.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, ffn_dim: int, eps: float,
                 modality_specific: bool):
        super().__init__()
        self.modality_specific = modality_specific
        make = lambda: TokenStreamLayers(dim, num_heads, num_kv_heads, head_dim, ffn_dim, eps)  # noqa: E731
        if modality_specific:
            self.text, self.video = make(), make()
        else:
            self.shared = make()
        # Per-block offsets to the shared timestep modulation (Wan-style): 6 vectors instead of a 6*dim^2 linear.
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, hidden_states: torch.Tensor, time_modulation: torch.Tensor, rope_cos: torch.Tensor,
                rope_sin: torch.Tensor, attn_mask: torch.Tensor | None, num_text_tokens: int) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (self.modulation + time_modulation).unsqueeze(2).unbind(1)
        if self.modality_specific:
            segments = [(self.text, hidden_states[:, :num_text_tokens]),
                        (self.video, hidden_states[:, num_text_tokens:])]
        else:
            segments = [(self.shared, hidden_states)]

        projected = [layers.attn.project(_modulate(layers.norm1(x), shift_a, scale_a)) for layers, x in segments]
        q, k, v = (torch.cat([p[i] for p in projected], dim=2) for i in range(3))
        attended = attention(apply_rotary(q, rope_cos, rope_sin), apply_rotary(k, rope_cos, rope_sin), v, attn_mask)

        outputs, start = [], 0
        for (layers, x), (_, _, _, gate) in zip(segments, projected):
            end = start + x.shape[1]
            x = x + gate_a * layers.attn.output(attended[:, :, start:end], gate)
            x = x + gate_f * layers.ff(_modulate(layers.norm2(x), shift_f, scale_f))
            outputs.append(x)
            start = end
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


# None: text to video. "first_frame": image to video, the image's clean latent given as the first latent frame
# (the way Wan 2.2 TI2V conditions), the sample's timestep shared by all frames (the modulation is per sample).
IMAGE_CONDITIONING = (None, "first_frame")


class HappyHorseTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Predicts the flow-matching velocity (noise - clean) for video latents given text states and a timestep.

    Inputs: `hidden_states` (batch, in_channels, frames, height, width) latents; `encoder_hidden_states`
    (batch, text_tokens, text_dim) from the text encoder; `timestep` (batch,) on the 0..1000 scale;
    optional `encoder_attention_mask` (batch, text_tokens), True/1 for real tokens, 0 for padding.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["HappyHorseBlock"]
    _repeated_blocks = ["HappyHorseBlock"]  # diffusers' marker for the repeated unit (regional compile, block swap)
    _skip_layerwise_casting_patterns = ["norm", "modulation"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_layers: int = 32,
        sandwich_layers: int = 2,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        attention_head_dim: int = 128,
        ffn_dim: int = 14336,
        text_dim: int = 4096,
        freq_dim: int = 256,
        rope_axes_dim: tuple[int, int, int] = (32, 48, 48),
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        image_conditioning: str | None = None,
    ):
        super().__init__()
        if image_conditioning not in IMAGE_CONDITIONING:
            raise ValueError(f"image_conditioning={image_conditioning!r}: use one of {IMAGE_CONDITIONING}")
        if 2 * sandwich_layers > num_layers:
            raise ValueError(f"sandwich_layers={sandwich_layers} needs at least {2 * sandwich_layers} layers")
        if sum(rope_axes_dim) != attention_head_dim or any(d % 2 for d in rope_axes_dim):
            raise ValueError(f"rope_axes_dim {rope_axes_dim} must be even and sum to attention_head_dim")
        if num_attention_heads % num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        dim = num_attention_heads * attention_head_dim
        patch_volume = math.prod(patch_size)

        self.video_in = nn.Linear(in_channels * patch_volume, dim)
        self.text_in = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embed = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.rope = RotaryEmbedding3D(rope_axes_dim, rope_theta)
        self.blocks = nn.ModuleList(
            HappyHorseBlock(dim, num_attention_heads, num_key_value_heads, attention_head_dim, ffn_dim, norm_eps,
                            modality_specific=i < sandwich_layers or i >= num_layers - sandwich_layers)
            for i in range(num_layers)
        )
        self.norm_out = nn.RMSNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.out_modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, out_channels * patch_volume)
        self.gradient_checkpointing = False

    def latent_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(frames, height, width) of the token grid for latents of shape (..., frames, height, width)."""
        pt, ph, pw = self.config.patch_size
        t, h, w = latent_shape[-3:]
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent size {tuple(latent_shape[-3:])} is not divisible by patch size {(pt, ph, pw)}")
        return t // pt, h // ph, w // pw

    def _patchify(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = latents.shape
        pt, ph, pw = self.config.patch_size
        x = latents.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4).flatten(1, 3)  # (b, tokens, c*pt*ph*pw)

    def _unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b = tokens.shape[0]
        pt, ph, pw = self.config.patch_size
        x = tokens.reshape(b, *grid, self.config.out_channels, pt, ph, pw)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, self.config.out_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True):
        grid = self.latent_grid(hidden_states.shape)
        num_text = encoder_hidden_states.shape[1]
        video = self.video_in(self._patchify(hidden_states))
        text = self.text_in(encoder_hidden_states.to(video.dtype))
        x = torch.cat([text, video], dim=1)

        time_emb = self.time_embed(timestep_embedding(timestep, self.config.freq_dim).to(x.dtype))
        time_modulation = self.time_modulation(time_emb).unflatten(1, (6, -1))
        rope_cos, rope_sin = self.rope(num_text, grid, x.device)

        attn_mask = None
        if encoder_attention_mask is not None:
            video_keys = torch.ones(x.shape[0], video.shape[1], dtype=torch.bool, device=x.device)
            attn_mask = torch.cat([encoder_attention_mask.bool(), video_keys], dim=1)[:, None, None, :]

        block_args = (time_modulation, rope_cos, rope_sin, attn_mask, num_text)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, *block_args)
            else:
                x = block(x, *block_args)

        shift, scale = (self.out_modulation + time_emb.unsqueeze(1)).unsqueeze(2).unbind(1)
        video = self.proj_out(_modulate(self.norm_out(x[:, num_text:]), shift, scale))
        sample = self._unpatchify(video, grid)
        if not return_dict:
            return (sample,)
        return Transformer2DModelOutput(sample=sample)
