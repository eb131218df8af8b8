"""The one place attention is computed, so a faster kernel can replace SDPA without touching any model.

Tensors are (batch, heads, tokens, head_dim). Keys and values may have fewer heads than queries
(grouped-query attention); `attn_mask` is a boolean (batch, 1, 1, tokens) key mask, True = attend.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    enable_gqa = key.shape[1] != query.shape[1]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, enable_gqa=enable_gqa)


_BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_attention}
_active_backend = "sdpa"


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    _BACKENDS[name] = fn


def set_attention_backend(name: str) -> None:
    global _active_backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    _active_backend = name


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    return _BACKENDS[_active_backend](query, key, value, attn_mask)
