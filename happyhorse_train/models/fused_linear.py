"""Linear layers that read the same input, computed as one matmul, with their LoRA branches as two more.

Q, K, V and the attention's output gate read the same tokens. Run one by one, each layer reads the input again
(the gate, 32 columns wide at 8B, is a poor matmul on its own), each peft LoRA branch reads it once more and
scales a full-size output, and the backward adds up one input gradient per layer and branch. `fused_linears`
computes the same outputs as

    split(x @ cat(W).T + cat(b) + (x @ cat(A).T) @ block_diag(s * B).T)

for every active adapter's A, B and scale s: three matmuls for the group, whatever its size. Parameters keep
their modules, names and shapes, so checkpoints and LoRA files do not change. Between forward and backward the
step keeps what the layer-by-layer one keeps (the weights themselves, not their concatenation, which is made
again in the backward: ~50 MB per group at 8B, for as long as its matmul runs).

A group with a layer this cannot compute exactly as peft would runs layer by layer, as before: a quantized or
fp8 base (not a plain `nn.Linear`), a module with hooks (DeepSpeed ZeRO-3 gathers weights in them), a replaced
`forward` (diffusers' and accelerate's offload hooks), DoRA, a LoRA bias, LoRA dropout while training, or
weights in another dtype than the input without autocast to reconcile them. (Global module hooks, such as a
profiler's per-module tracking, do not stop fusing: they see the block, not its fused layers.)
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

_enabled = True
_emulated_autocast: torch.dtype | None = None


@contextlib.contextmanager
def unfused_linears():
    """Run the enclosed code layer by layer (a baseline, or a reference for the fused result)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


@contextlib.contextmanager
def emulated_autocast(dtype: torch.dtype):
    """On a device without autocast (meta), cast as autocast to `dtype` would: for the memory planner, which
    emulates autocast there (planner/measure.py)."""
    global _emulated_autocast
    previous, _emulated_autocast = _emulated_autocast, dtype
    try:
        yield
    finally:
        _emulated_autocast = previous


def fused_linears(x: torch.Tensor, layers: list[nn.Module]) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]`, in one matmul for the bases and two per active LoRA adapter."""
    bases = [_base(layer) for layer in layers]
    adapters = [_adapters_on(layer) for layer in layers]
    autocast = _autocast_dtype(x)
    if not (_enabled and _fusable(x, autocast, layers, bases, adapters)):
        return [layer(x) for layer in layers]
    # Cast before concatenating, as autocast would for each layer: no float32 copy of the whole group.
    dtype = autocast or x.dtype
    bias = None if bases[0].bias is None else torch.cat([base.bias.to(dtype) for base in bases])
    out = _FusedLinear.apply(x, dtype, bias, *(base.weight for base in bases))
    rows = out.flatten(0, -2)
    for adapter in dict.fromkeys(name for names in adapters for name in names):
        has = [adapter in names for names in adapters]
        down = torch.cat([layer.lora_A[adapter].weight.to(dtype) for layer, h in zip(layers, has) if h])
        # Each layer's B in its own block (an empty one for a layer without this adapter), zeros elsewhere:
        # one kernel, at the price of multiplying the zeros too (~2% of the group's FLOPs at 8B, rank 32).
        up = torch.block_diag(*(
            (layer.lora_B[adapter].weight * layer.scaling[adapter]).to(dtype) if h
            else x.new_zeros(base.out_features, 0, dtype=dtype)
            for layer, base, h in zip(layers, bases, has)
        ))
        # base + product in one op, where peft scales the product and adds it in two passes over the output
        rows = torch.addmm(rows, F.linear(x, down).flatten(0, -2), up.T)
    return list(rows.view(out.shape).split([base.out_features for base in bases], dim=-1))


class _FusedLinear(torch.autograd.Function):
    """x @ cat(W).T + b, keeping for the backward what separate linears keep: the weights themselves (autograd
    would keep their concatenation, for every block when nothing is checkpointed) and, when the weights train,
    the input. The backward concatenates the weights again for the input's gradient."""

    @staticmethod
    def forward(ctx, x, dtype, bias, *weights):
        ctx.dtype, ctx.input_dtype = dtype, x.dtype
        x = x.to(dtype)
        ctx.save_for_backward(x if any(ctx.needs_input_grad[3:]) else None, *weights)
        return F.linear(x, torch.cat([w.to(dtype) for w in weights]), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, *weights = ctx.saved_tensors  # (read once: checkpointing unpacks saved tensors one time only)
        grad_out = grad_out.to(ctx.dtype)
        grad_x = grad_bias = None
        grad_weights = [None] * len(weights)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ torch.cat([w.to(ctx.dtype) for w in weights])).to(ctx.input_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.flatten(0, -2).sum(0)
        if any(ctx.needs_input_grad[3:]):
            fused = grad_out.flatten(0, -2).T @ x.flatten(0, -2)
            grad_weights = [g.to(w.dtype) for g, w in zip(fused.split([w.shape[0] for w in weights]), weights)]
        return grad_x, None, grad_bias, *grad_weights


def _base(layer: nn.Module) -> nn.Module:
    return layer.base_layer if type(layer) is LoraLinear else layer


def _adapters_on(layer: nn.Module) -> list[str]:
    """The adapters peft would add to this layer's output."""
    if type(layer) is not LoraLinear or layer.merged or layer.disable_adapters:
        return []
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _unhooked(module: nn.Module) -> bool:
    """Nothing runs around this module's forward that computing it inside another's would skip."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    return not any(hooks) and "forward" not in vars(module)


def _plain(module: nn.Module) -> bool:
    """An exact nn.Linear running nn.Linear's forward, unhooked."""
    return type(module) is nn.Linear and _unhooked(module) and module.weight.is_floating_point()


def _fusable(x: torch.Tensor, autocast: torch.dtype | None, layers: list[nn.Module], bases: list[nn.Module],
             adapters: list[list[str]]) -> bool:
    if not all(_plain(base) and base.weight.device == x.device for base in bases):
        return False
    if len({base.bias is None for base in bases}) > 1:
        return False
    weights = [base.weight for base in bases]
    for layer, names in zip(layers, adapters):
        if type(layer) is not LoraLinear:
            continue
        if not _unhooked(layer) or (layer.merged and layer.disable_adapters):  # (peft would unmerge first)
            return False
        for name in names:
            down, up, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
            if name in layer.lora_variant or not (_plain(down) and _plain(up)) or up.bias is not None:
                return False  # DoRA and other variants, a LoRA bias
            if dropout.training and not isinstance(dropout, nn.Identity) and dropout.p > 0:
                return False
            weights += [down.weight, up.weight]
    # Without autocast, F.linear needs one dtype; peft would have cast the input to each adapter's dtype.
    return autocast is not None or all(w.dtype == x.dtype for w in weights)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on x's device; None without autocast."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device):
        return _emulated_autocast
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
