"""Linear layers that read the same input, computed as one matmul, with their LoRA branches as two more.

Q, K, V and the attention's output gate read the same tokens. Run one by one, each layer reads the input again
(the gate, 32 columns wide at 8B, is a poor matmul on its own), each peft LoRA branch reads it once more and
scales a full-size output, and the backward adds up one input gradient per layer and branch. `fused_linears`
computes the same outputs as

    split(x @ cat(W).T + cat(b) + (x @ cat(A).T) @ block_diag(s * B).T)

for every active adapter's A, B and scale s: three matmuls for the group, whatever its size. Parameters keep
their modules, names and shapes, so checkpoints and LoRA files do not change. Frozen weights are concatenated
again in the backward rather than kept concatenated: the step holds no more than the unfused one.

A group with a layer this cannot compute exactly as peft would runs layer by layer, as before: a quantized or
fp8 base (not a plain `nn.Linear`), a module with hooks (DeepSpeed ZeRO-3 gathers weights in them), a replaced
`forward` (diffusers' and accelerate's offload hooks), DoRA, a LoRA bias, LoRA dropout while training, or
weights in another dtype than the input without autocast to reconcile them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

_enabled = True


@contextlib.contextmanager
def unfused_linears():
    """Run the enclosed code layer by layer (a baseline, or a reference for the fused result)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def fused_linears(x: torch.Tensor, layers: list[nn.Module]) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]`, in one matmul for the bases and two per active LoRA adapter."""
    if not (_enabled and all(_fusable(layer, x) for layer in layers)):
        return [layer(x) for layer in layers]
    bases = [_base(layer) for layer in layers]
    if len({base.bias is None for base in bases}) > 1:
        return [layer(x) for layer in layers]
    # Cast before concatenating, as autocast would for each layer: no float32 copy of the whole group.
    dtype = _autocast_dtype(x) or x.dtype
    bias = None if bases[0].bias is None else torch.cat([base.bias.to(dtype) for base in bases])
    weights = [base.weight for base in bases]
    if any(w.requires_grad for w in weights) or (bias is not None and bias.requires_grad):
        out = F.linear(x, torch.cat([w.to(dtype) for w in weights]), bias)
    else:
        out = _FrozenFusedLinear.apply(x, dtype, bias, *weights)
    rows = out.flatten(0, -2)  # a view; addmm adds each adapter's product into it without a separate pass
    for adapter in _active_adapters(layers):
        down = torch.cat([layer.lora_A[adapter].weight.to(dtype) for layer in layers if _adapts(layer, adapter)])
        # A layer without this adapter gets an empty block: its outputs receive nothing.
        up = torch.block_diag(*(
            layer.lora_B[adapter].weight * layer.scaling[adapter] if _adapts(layer, adapter)
            else x.new_zeros(base.out_features, 0)
            for layer, base in zip(layers, bases)
        ))
        rows = torch.addmm(rows, F.linear(x, down).flatten(0, -2), up.T.to(dtype))
    return list(rows.view(out.shape).split([base.out_features for base in bases], dim=-1))


class _FrozenFusedLinear(torch.autograd.Function):
    """x @ cat(W).T + b for frozen W. Autograd would keep the concatenated copy of W until the backward (every
    block's, without checkpointing); this keeps the weights themselves, which exist anyway, and concatenates
    them again in the backward."""

    @staticmethod
    def forward(ctx, x, dtype, bias, *weights):
        ctx.dtype, ctx.input_dtype = dtype, x.dtype
        ctx.save_for_backward(*weights)
        return F.linear(x.to(dtype), torch.cat([w.to(dtype) for w in weights]), bias)

    @staticmethod
    def backward(ctx, grad_out):
        weights = ctx.saved_tensors  # (read once: checkpointing unpacks saved tensors one time only)
        grad_x = grad_out.to(ctx.dtype) @ torch.cat([w.to(ctx.dtype) for w in weights])
        return grad_x.to(ctx.input_dtype), None, None, *(None for _ in weights)


def _base(layer: nn.Module) -> nn.Module:
    return layer.base_layer if type(layer) is LoraLinear else layer


def _adapters_on(layer: nn.Module) -> list[str]:
    """The adapters peft would add to this layer's output."""
    if type(layer) is not LoraLinear or layer.merged or layer.disable_adapters:
        return []
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _adapts(layer: nn.Module, adapter: str) -> bool:
    return adapter in _adapters_on(layer)


def _active_adapters(layers: list[nn.Module]) -> list[str]:
    return list(dict.fromkeys(name for layer in layers for name in _adapters_on(layer)))


def _unhooked(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module))


def _plain(module: nn.Module) -> bool:
    """An exact nn.Linear running nn.Linear's forward: nothing happens around it that fusing would skip."""
    return type(module) is nn.Linear and _unhooked(module) and module.weight.is_floating_point()


def _fusable(layer: nn.Module, x: torch.Tensor) -> bool:
    base = _base(layer)
    if not _plain(base) or base.weight.device != x.device:
        return False
    weights = [base.weight]
    if type(layer) is LoraLinear:
        if not _unhooked(layer) or (layer.merged and layer.disable_adapters):  # (peft would unmerge first)
            return False
        for adapter in _adapters_on(layer):
            down, up, dropout = layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter]
            if adapter in layer.lora_variant or not (_plain(down) and _plain(up)) or up.bias is not None:
                return False
            if dropout.training and not isinstance(dropout, nn.Identity) and dropout.p > 0:
                return False
            weights += [down.weight, up.weight]
    # Without autocast, F.linear needs one dtype; peft would have cast the input to each adapter's dtype.
    return _autocast_dtype(x) is not None or all(w.dtype == x.dtype for w in weights)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on x's device, None without autocast."""
    if x.device.type == "meta":  # shapes only: the memory planner emulates autocast there, with x in its dtype
        return x.dtype
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
