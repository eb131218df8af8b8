"""Frozen base weights stored in fewer bits: int8 and NF4 through bitsandbytes, fp8 through `Float8Linear`.

Only the linear layers inside the transformer's repeated blocks are quantized (they hold nearly all of
its weights); embeddings, time/text projections, `proj_out` and norms stay in the compute dtype. Every
quantized layer is an `nn.Linear` subclass, so peft's LoRA wraps it like any other linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# "bf16" is the compute dtype itself, unquantized (it may be float16 or float32 when the run computes in those).
BASE_WEIGHT_FORMATS = ("bf16", "int8", "nf4", "fp8", "fp8-block")
FP8_BLOCK_SIZE = 128  # one scale per 128x128 tile of the weight, as in DeepSeek-V3-style fp8 checkpoints
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def check_format(fmt: str) -> None:
    if fmt not in BASE_WEIGHT_FORMATS:
        raise ValueError(f"unknown base weight format {fmt!r}; choose one of {', '.join(BASE_WEIGHT_FORMATS)}")


def _abs_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    # max(|x|) without an |x| copy of the whole tensor
    return torch.maximum(x.amax(dim), x.amin(dim).neg())


def _per_block_(matrix: torch.Tensor, per_block: torch.Tensor, block: int, op) -> None:
    """Apply `op(tile, factor)` in place to every block x block tile of `matrix` with that tile's entry of
    `per_block` ((ceil(rows/block), ceil(cols/block))). Edge tiles may be smaller; nothing is padded."""
    factors = per_block.repeat_interleave(block, dim=0)[: matrix.shape[0]]  # (rows, column tiles)
    full = matrix.shape[1] // block * block
    if full:
        op(matrix[:, :full].unflatten(1, (-1, block)), factors[:, : full // block, None])
    if full < matrix.shape[1]:
        op(matrix[:, full:], factors[:, -1:])


def _block_abs_max(weight: torch.Tensor, block: int) -> torch.Tensor:
    """max |w| over each block x block tile, as (ceil(rows/block), ceil(cols/block))."""
    full = weight.shape[1] // block * block
    columns = []
    if full:
        columns.append(_abs_max(weight[:, :full].unflatten(1, (-1, block)), dim=-1))
    if full < weight.shape[1]:
        columns.append(_abs_max(weight[:, full:], dim=-1).unsqueeze(1))
    per_row = torch.cat(columns, dim=1)  # (rows, column tiles): small, so padding it is cheap
    padded = F.pad(per_row, (0, 0, 0, -per_row.shape[0] % block))
    return padded.unflatten(0, (-1, block)).amax(dim=1)


def quantize_fp8(weight: torch.Tensor, block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale) with weight ~= fp8 * scale; one scale, or one per block x block tile.

    Scales map each tile's largest magnitude to fp8's largest value (448), so nothing saturates.
    """
    work = weight.detach().to(torch.float32, copy=True)  # the one full-size temporary
    if block_size is None:
        low, high = torch.aminmax(work)
        scale = torch.maximum(high, low.neg()) / FP8_MAX
    else:
        scale = _block_abs_max(work, block_size) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero tile: any scale works
    if block_size is None:
        work.div_(scale)
    else:
        _per_block_(work, scale, block_size, lambda tile, s: tile.div_(s))
    return work.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class Float8Linear(nn.Linear):
    """A frozen linear whose weight is stored as float8_e4m3fn with float32 scales (per tensor or per tile).

    `forward` upcasts the weight to the compute dtype for this one call (the autocast dtype under
    autocast, else the input's) and calls `F.linear`, so only one layer's weight is ever held in
    high precision. Gradients flow to the input (e.g. into a LoRA adapter), never to the fp8 weight.
    `compute_dtype` is also what peft reads to choose the dtype of the LoRA weights it adds.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block_size: int | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias=bias, device="meta")  # no float weight allocated
        self.block_size = block_size
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        scale_shape = () if block_size is None else (-(-out_features // block_size), -(-in_features // block_size))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))

    @classmethod
    def from_weights(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype, block_size: int | None = None
    ) -> Float8Linear:
        """Quantize a (out_features, in_features) weight; the layer lives on the weight's device."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias is not None, block_size=block_size,
                    compute_dtype=compute_dtype, device="meta")
        quantized, scale = quantize_fp8(weight, block_size)
        layer.weight = nn.Parameter(quantized, requires_grad=False)
        layer.weight_scale = scale
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(compute_dtype, copy=True), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self.weight.to(dtype)  # a fresh tensor: scaled in place below
        scale = self.weight_scale.to(dtype)
        if self.block_size is None:
            return weight.mul_(scale)
        _per_block_(weight, scale, self.block_size, lambda tile, s: tile.mul_(s))
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        autocasting = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocasting else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, self.dequantized_weight(dtype), bias)

    def extra_repr(self) -> str:
        scales = "per tensor" if self.block_size is None else f"per {self.block_size}x{self.block_size} block"
        return f"{super().extra_repr()}, fp8 e4m3 with scales {scales}, compute_dtype={self.compute_dtype}"


def _bnb_int8(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype, device) -> nn.Module:
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                device="meta")
    # Int8Params quantizes (row-wise absmax) when moved off the CPU or, from the CPU, to any real device.
    layer.weight = bnb.nn.Int8Params(weight.detach().to("cpu", compute_dtype), requires_grad=False,
                                     has_fp16_weights=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu", compute_dtype, copy=True), requires_grad=False)
    return layer.to(device)


def _bnb_nf4(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype, device) -> nn.Module:
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.detach().to(compute_dtype), requires_grad=False, quant_type="nf4",
                                     module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(compute_dtype, copy=True), requires_grad=False)
    # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks a Linear4bit's weight, in place, for a fast inference
    # kernel on its first forward in eval mode without grad (a validation pass). The repacking asserts
    # "N must be divisible by block_n" for out_features not a multiple of 32 (HappyHorse's to_gate has one
    # output per head), and a repacked layer fails the next training step ("a view of a leaf Variable that
    # requires grad is being used in an in-place operation"). Keep the standard layout, which does both.
    layer.support_avx512bf16_for_cpu = False
    return layer.to(device)  # Params4bit quantizes (blockwise NF4, blocksize 64) on this move


def quantized_linear_from_weights(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, compute_dtype: torch.dtype,
                                  device: torch.device | str) -> nn.Module:
    """A frozen layer on `device` computing `x @ weight.T + bias`, its weight stored in `fmt`.

    The weight is cast to `compute_dtype` before it is quantized, as loading in that dtype and then
    quantizing would do; the bias stays in `compute_dtype`.
    """
    check_format(fmt)
    if fmt == "int8":
        return _bnb_int8(weight, bias, compute_dtype, device)
    if fmt == "nf4":
        return _bnb_nf4(weight, bias, compute_dtype, device)
    weight = weight.detach().to(device, compute_dtype)
    bias = None if bias is None else bias.to(device)
    if fmt == "bf16":
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        return layer
    block_size = FP8_BLOCK_SIZE if fmt == "fp8-block" else None
    return Float8Linear.from_weights(weight, bias, compute_dtype, block_size)


def quantize_linear(linear: nn.Linear, fmt: str, compute_dtype: torch.dtype) -> nn.Module:
    """The replacement for `linear` in `fmt`, on the same device and frozen ("bf16": `linear` itself, cast)."""
    check_format(fmt)
    if fmt == "bf16":
        return linear.to(compute_dtype).requires_grad_(False)
    return quantized_linear_from_weights(linear.weight, linear.bias, fmt, compute_dtype, linear.weight.device)


def kept_in_float32(model: nn.Module, name: str) -> bool:
    """diffusers' rule: a tensor or module whose dotted name has a component listed in the model's
    `_keep_in_fp32_modules` stays float32."""
    return not set(getattr(model, "_keep_in_fp32_modules", None) or []).isdisjoint(name.split("."))


def mark_quantized(model: nn.Module, fmt: str) -> None:
    """Set the flags diffusers' own bitsandbytes loading sets, so others treat the model as quantized.

    peft reads `is_loaded_in_8bit` / `is_loaded_in_4bit` to wrap bitsandbytes layers with its bitsandbytes
    LoRA layers (without them it uses its plain Linear one); diffusers' `to(dtype)`, `half()` and `float()`
    refuse a model with `is_quantized`, where a cast would undo the quantization.
    """
    model.is_quantized = True
    model.is_loaded_in_8bit = fmt == "int8"
    model.is_loaded_in_4bit = fmt == "nf4"


def quantizable_linear_names(model: nn.Module) -> list[str]:
    """Names of the plain `nn.Linear` layers inside the model's repeated blocks, in module order.

    The blocks are the modules whose class is named in `model._repeated_blocks` (the diffusers marker:
    ["HappyHorseBlock"], ["WanTransformerBlock"]). Layers under a module named in `_keep_in_fp32_modules`
    are left out, as are `nn.Linear` subclasses (e.g. layers already quantized).
    """
    block_classes = set(getattr(model, "_repeated_blocks", None) or [])
    if not block_classes:
        raise ValueError(f"{type(model).__name__} does not name its repeated blocks (_repeated_blocks), "
                         "so there is no telling which linear layers to quantize")
    names: dict[str, None] = {}  # ordered and without repeats, should blocks nest
    for block_name, block in model.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for name, module in block.named_modules(prefix=block_name):
            if type(module) is nn.Linear and not kept_in_float32(model, name):
                names[name] = None
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear inside its repeated blocks {sorted(block_classes)}")
    return list(names)
