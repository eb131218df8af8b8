"""The one place attention is computed, so a faster kernel can replace SDPA without touching any model.

Tensors are (batch, heads, tokens, head_dim). Keys and values may have fewer heads than queries
(grouped-query attention); `attn_mask` is a boolean (batch, 1, 1, tokens) key mask, True = attend.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

# Fastest first, as measured on an H200 at 42k tokens, 32 heads x 128, bf16 (docs/benchmarks.md, reference
# figures): cuDNN 545 TFLOP/s forward+backward, flash 329, memory-efficient 140. SDPA takes the first that
# accepts the inputs.
CUDA_KERNEL_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
]


def sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    grouped = key.shape[1] != query.shape[1]
    if not query.is_cuda:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, enable_gqa=grouped)
    if grouped and attn_mask is not None:
        # Flash refuses masks and memory-efficient refuses grouped heads: should cuDNN decline a masked
        # grouped call, only the math kernel (a tokens^2 score matrix) would be left. Equal heads keep
        # memory-efficient in reach.
        repeats = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        grouped = False
    with sdpa_kernel(CUDA_KERNEL_PRIORITY, set_priority=True):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, enable_gqa=grouped)


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


@contextlib.contextmanager
def using_attention_backend(name: str):
    """Run the enclosed code with the named backend, then restore the previous one."""
    global _active_backend
    previous = _active_backend
    set_attention_backend(name)
    try:
        yield
    finally:
        _active_backend = previous
