"""What the backward pass keeps and what it recomputes, per transformer block; and compiling the blocks.

Full checkpointing keeps only each block's inputs and reruns the whole block in the backward. Attention is the
costliest thing to rerun (at 42k tokens, more than half of a block's forward FLOPs) and its output is small
(tokens x heads x head_dim, plus a per-head logsumexp), so the first `saved_attention_blocks` blocks keep their
attention outputs and rerun only the rest: time for memory, one block at a time.

Both are diffusers' gradient-checkpointing function (`model.enable_gradient_checkpointing(fn)`), applied from
outside the model; any backbone whose forward calls `self._gradient_checkpointing_func(block, ...)` takes it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from happyhorse_train.memory.offload import offloaded_checkpoint, repeated_blocks

_aten = torch.ops.aten
# Every fused attention kernel SDPA may dispatch to, on any device.
ATTENTION_OPS = frozenset(
    getattr(_aten, name).default
    for name in (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(_aten, name)
)


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def full_checkpoint(block: nn.Module, *args):
    return checkpoint(block, *args, use_reentrant=False)


def attention_keeping_checkpoint(block: nn.Module, *args):
    context = functools.partial(create_selective_checkpoint_contexts, _keep_attention)
    return checkpoint(block, *args, use_reentrant=False, context_fn=context)


class BlockCheckpointing:
    """The checkpointing function: attention kept in the first `saved_attention_blocks` of `blocks`, the rest
    fully recomputed. With `compiled`, each variant is one torch.compile'd function around checkpoint and block,
    so the compiler sees what is saved (compiled once per block structure, not per block)."""

    def __init__(self, blocks: list[nn.Module], saved_attention_blocks: int, compiled: bool):
        self.keeping_attention = {id(block) for block in blocks[:saved_attention_blocks]}
        self._full, self._keeping = full_checkpoint, attention_keeping_checkpoint
        if compiled:
            self._full = torch.compile(full_checkpoint, dynamic=False)
            self._keeping = torch.compile(attention_keeping_checkpoint, dynamic=False)

    def __call__(self, block: nn.Module, *args):
        # Chosen outside the compiled functions: a branch on the block inside them would compile once per block.
        return (self._keeping if id(block) in self.keeping_attention else self._full)(block, *args)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each repeated block (diffusers' regional compilation): the forward passes that do not
    checkpoint (inference, validation, offloaded checkpointing) run compiled too."""
    model.compile_repeated_blocks(dynamic=False)


def checkpointing_function(model: nn.Module, cfg):
    """The gradient-checkpointing function the training config asks for (memory.* and trainer.compile)."""
    if cfg.memory.offload_activations:
        return offloaded_checkpoint
    return BlockCheckpointing(repeated_blocks(model), cfg.memory.saved_attention_blocks, cfg.trainer.compile)
