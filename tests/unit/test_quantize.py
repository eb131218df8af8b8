"""Quantized frozen linears (int8, NF4, fp8): accuracy against the bf16 layer, and LoRA training through them."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn as nn

from happyhorse_train.memory.quantize import (
    BASE_WEIGHT_FORMATS,
    Float8Linear,
    mark_quantized,
    quantizable_linear_names,
    quantize_linear,
)
from happyhorse_train.models.happyhorse.transformer import HappyHorseTransformer3DModel
from happyhorse_train.models.presets import load_preset

# bitsandbytes' int8 inference path says it casts bf16 inputs to fp16; expected, and said on every call.
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast:UserWarning")

QUANTIZED = ["int8", "nf4", "fp8", "fp8-block"]
# ||y_q - y_bf16|| / ||y_bf16|| for one layer (nn.Linear init, 64 random inputs). Measured over 3 seeds on
# a 384x640 and a 200x300 layer (the latter has partial 128x128 tiles), with bf16 inputs and under bf16
# autocast with float32 inputs alike: int8 0.0082-0.0088, nf4 0.090-0.092, fp8 and fp8-block 0.0253-0.0259.
# Bounds are about twice that.
LAYER_ERROR_BOUND = {"int8": 0.02, "nf4": 0.18, "fp8": 0.05, "fp8-block": 0.05}
STORAGE_DTYPE = {"int8": torch.int8, "nf4": torch.uint8, "fp8": torch.float8_e4m3fn, "fp8-block": torch.float8_e4m3fn}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out", "gate_proj", "up_proj", "down_proj"]
PEFT_LAYER = {
    "bf16": "peft.tuners.lora.layer.Linear",
    "int8": "peft.tuners.lora.bnb.Linear8bitLt",
    "nf4": "peft.tuners.lora.bnb.Linear4bit",
    "fp8": "peft.tuners.lora.layer.Linear",
    "fp8-block": "peft.tuners.lora.layer.Linear",
}


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.float() - reference.float()).norm() / reference.float().norm()).item()


def bf16_copy(linear: nn.Linear) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features)
    copy.load_state_dict(linear.state_dict())
    return copy.to(torch.bfloat16)


@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("shape", [(384, 640), (200, 300)], ids=["whole-tiles", "partial-tiles"])
def test_quantized_layer_output_is_close_to_bf16(fmt, shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    reference = bf16_copy(linear)
    layer = quantize_linear(linear, fmt, torch.bfloat16).eval()
    x = torch.randn(64, shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x.bfloat16())
        plain = layer(x.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs: float32 activations, bf16 compute
            autocast = layer(x)
    assert layer.weight.dtype == STORAGE_DTYPE[fmt] and not layer.weight.requires_grad
    assert plain.shape == expected.shape
    for output in (plain, autocast):
        assert 0 < relative_error(output, expected) < LAYER_ERROR_BOUND[fmt]


def test_bf16_format_is_the_linear_in_the_compute_dtype():
    torch.manual_seed(0)
    linear = nn.Linear(48, 32)
    reference = bf16_copy(linear)
    layer = quantize_linear(linear, "bf16", torch.bfloat16)
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in layer.parameters())
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


def test_unknown_format_names_the_known_ones():
    with pytest.raises(ValueError, match="int4") as error:
        quantize_linear(nn.Linear(4, 4), "int4", torch.bfloat16)
    assert all(fmt in str(error.value) for fmt in BASE_WEIGHT_FORMATS)


def test_per_block_fp8_scales_keep_small_tiles_that_one_scale_flushes():
    """A 128-row band 1e-5 times smaller than the rest: one scale for the tensor pushes it below fp8's
    smallest subnormals, a scale per 128x128 tile keeps its usual ~3% error."""
    torch.manual_seed(0)
    weight = torch.randn(384, 256)
    weight[128:256] *= 1e-5
    x = torch.randn(16, 256)
    expected = (x @ weight.T)[:, 128:256]
    errors = {}
    for fmt, block_size in (("fp8", None), ("fp8-block", 128)):
        layer = Float8Linear.from_weights(weight, None, torch.float32, block_size)
        with torch.no_grad():
            errors[fmt] = relative_error(layer(x)[:, 128:256], expected)
    assert errors["fp8-block"] < 0.05
    assert errors["fp8"] > 0.5


def test_float8_linear_stores_fp8_with_float32_scales_and_passes_gradients_to_its_input():
    torch.manual_seed(0)
    weight, bias = torch.randn(200, 300), torch.randn(200)
    layer = Float8Linear.from_weights(weight, bias, torch.bfloat16, block_size=128)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.shape == (200, 300)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (2, 3)
    assert layer.bias.dtype == torch.bfloat16
    assert set(layer.state_dict()) == {"weight", "bias", "weight_scale"}
    x = torch.randn(8, 300, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.weight.grad is None and not layer.weight.requires_grad
    # without autocast it computes in the input's dtype
    assert layer(torch.randn(2, 300)).dtype == torch.float32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.gate = nn.Sequential(nn.Linear(8, 8))
        self.norm_proj = nn.Linear(8, 8)  # named in _keep_in_fp32_modules below


class TwoBlocks(nn.Module):
    _repeated_blocks = ["Block"]
    _keep_in_fp32_modules = ["norm_proj"]

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.proj_out = nn.Linear(8, 8)


def test_quantizable_linears_are_the_repeated_blocks_linears():
    assert quantizable_linear_names(TwoBlocks()) == [
        "blocks.0.proj", "blocks.0.gate.0", "blocks.1.proj", "blocks.1.gate.0",
    ]
    model = HappyHorseTransformer3DModel(**load_preset("tiny")["transformer"])
    names = quantizable_linear_names(model)
    # 3 layers, sandwich 1: text + video streams in the first and last, one shared in the middle; 8 linears each
    assert len(names) == 5 * 8
    assert all(name.startswith("blocks.") for name in names)
    assert {name.rsplit(".", 1)[1] for name in names} == {
        "to_q", "to_k", "to_v", "to_gate", "to_out", "gate_proj", "up_proj", "down_proj",
    }


def test_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(ValueError, match="_repeated_blocks"):
        quantizable_linear_names(nn.Sequential(nn.Linear(4, 4)))


def small_transformer_with_base(fmt: str) -> HappyHorseTransformer3DModel:
    """The HappyHorse architecture at hidden size 192, so fp8-block meets whole and partial 128x128 tiles,
    frozen in bf16 with its block linears in `fmt` (what the streamed loader produces)."""
    config = {
        **load_preset("tiny")["transformer"],
        "num_layers": 2, "attention_head_dim": 48, "rope_axes_dim": [16, 16, 16], "ffn_dim": 320,
    }
    torch.manual_seed(0)
    model = HappyHorseTransformer3DModel(**config)
    nn.Module.to(model, torch.bfloat16)  # (diffusers' own to() warns about _keep_in_fp32_modules on a dtype cast)
    for name in quantizable_linear_names(model):
        model.set_submodule(name, quantize_linear(model.get_submodule(name), fmt, torch.bfloat16))
    if fmt != "bf16":
        mark_quantized(model, fmt)
    return model.requires_grad_(False).eval()  # after the swap: new layers start in training mode


@pytest.mark.parametrize("fmt", ["bf16", *QUANTIZED])
def test_lora_on_a_quantized_base_trains(fmt):
    """LoRA set up as the trainer does (peft via add_adapter, adapter weights float32, bf16 autocast) lowers
    a regression loss through a quantized base, after a no-grad validation-style pass in eval mode."""
    model = small_transformer_with_base(fmt)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 2, 4, 4, generator=generator)
    text = torch.randn(2, 5, 32, generator=generator)
    timestep = torch.tensor([200.0, 700.0])
    target = 0.5 * torch.randn(latents.shape, generator=generator)

    def loss_now() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = model(latents, text, timestep).sample
        return torch.nn.functional.mse_loss(prediction.float(), target)

    with torch.no_grad():
        loss_now()  # where bitsandbytes would repack NF4 weights for a CPU kernel (see _bnb_nf4 in quantize.py)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    wrappers = {type(m).__module__ + "." + type(m).__name__ for n, m in model.named_modules() if n.endswith("to_q")}
    assert wrappers == {PEFT_LAYER[fmt]}
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in name and p.dtype == torch.float32 for name, p in lora.items())

    model.train()
    optimizer = torch.optim.AdamW(lora.values(), lr=3e-2)
    losses = []
    for step in range(12):
        loss = loss_now()
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            # The first block's adapters get a gradient only through every later block's quantized linears.
            # (The last block's text-stream outputs are discarded by the model, so those get none.)
            first_block = [p for n, p in lora.items() if n.startswith("blocks.0.") and "lora_B" in n]
            assert len(first_block) == 2 * len(LORA_TARGETS)
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_block)
        optimizer.step()
        losses.append(loss.item())

    # measured: the loss falls to 0.136-0.144 of its start in 12 steps for every format (the curves nearly coincide;
    # smoothly: 0.99, 0.93, 0.80, 0.60, 0.50, 0.37, 0.29 ...)
    assert losses[-1] < 0.3 * losses[0], losses
    block_linear = model.get_submodule("blocks.0.text.attn.to_q").get_base_layer()
    assert block_linear.weight.dtype == (STORAGE_DTYPE.get(fmt, torch.bfloat16)) and block_linear.weight.grad is None
