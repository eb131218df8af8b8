"""models/fused_linear.py: layers reading one input run as one matmul (their LoRAs as two more), with peft's results."""

import contextlib

import peft
import pytest
import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer

from happyhorse_train.models.fused_linear import fused_linears, unfused_linears
from happyhorse_train.models.happyhorse.spec import HappyHorseSpec
from happyhorse_train.training.adapters import make_trainable
from tests.op_count import OpCount
from tests.unit.test_transformer import tiny_inputs, tiny_transformer

_aten = torch.ops.aten
MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default}


def trainable_transformer(mode="lora", rank=4, alpha=8.0):
    """The tiny transformer made trainable as train.py makes it (fp32), LoRA B random (B = 0 would make every
    LoRA gradient but B's zero)."""
    model = tiny_transformer()
    lora = type("Lora", (), {"rank": rank, "alpha": alpha, "dropout": 0.0, "target_modules": None, "init": "default"})
    make_trainable(model, mode, lora, HappyHorseSpec(), torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.train()


def loss_and_grads(model, fused: bool, autocast: bool = False):
    """Loss, trained-parameter gradients and matmuls of the forward, and the shapes of what autograd kept for
    the backward beyond the parameters."""
    latents, text, timestep = tiny_inputs()
    model.zero_grad(set_to_none=True)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = set()

    def keep(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            kept.add(tuple(sorted(tensor.shape)))  # (sorted: a matmul keeps its weight transposed)
        return tensor

    count = OpCount(MATMULS)
    with count, contextlib.nullcontext() if fused else unfused_linears(), \
            torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(latents, text, timestep).sample.float().square().mean()
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return loss.detach(), grads, count.count, kept


def concatenated_weight(model) -> tuple[int, int]:
    attn = model.blocks[1].shared.attn
    layers = [attn.to_q, attn.to_k, attn.to_v, attn.to_gate]
    return tuple(sorted((sum(layer.out_features for layer in layers), attn.to_q.in_features)))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_loss_and_gradients_equal_layer_by_layer_with_fewer_matmuls(mode):
    model = trainable_transformer(mode)  # LoRA: alpha / rank = 2, a scale the fused path folds into B
    fused_loss, fused_grads, fused_matmuls, fused_kept = loss_and_grads(model, fused=True)
    loss, grads, matmuls, _ = loss_and_grads(model, fused=False)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=0)
    assert grads.keys() == fused_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # Per stream, Q, K, V and the attention gate take 1 matmul instead of 4, and their LoRAs 2 instead of 4 x 2;
    # the last block's text stream adapts only K and V (the rest cannot reach the output): 4 + 2 x 2 unfused.
    streams = 5  # tiny: a modality-specific block (text, video), a shared one, another modality-specific one
    saved = 4 * (12 - 3) + (8 - 3) if mode == "lora" else streams * (4 - 1)
    assert matmuls - fused_matmuls == saved
    assert concatenated_weight(model) not in fused_kept  # the backward concatenates again instead


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_bf16_autocast_gradients_match_within_bf16_rounding(mode):
    model = trainable_transformer(mode)
    fused_loss, fused_grads, _, fused_kept = loss_and_grads(model, fused=True, autocast=True)
    loss, grads, _, _ = loss_and_grads(model, fused=False, autocast=True)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-2, atol=0)
    for name, grad in grads.items():  # bf16 products summed in another order: compared against the largest entry
        assert (fused_grads[name] - grad).abs().max() <= 0.05 * grad.abs().max() + 1e-6, name
    assert concatenated_weight(model) not in fused_kept


def test_several_adapters_merged_and_disabled_give_peft_outputs():
    model = trainable_transformer()
    # A second adapter on Q only: the other layers of the group get an empty block for it.
    first = next(iter(model.peft_config))
    q_only = peft.LoraConfig(r=2, target_modules=["to_q"], init_lora_weights="gaussian")
    model.add_adapter(q_only, adapter_name="q_only")
    model.set_adapters([first, "q_only"], weights=[0.7, 1.5])
    latents, text, timestep = tiny_inputs()

    def both():
        with torch.no_grad():
            fused = model(latents, text, timestep).sample
            with unfused_linears():
                return fused, model(latents, text, timestep).sample

    fused, reference = both()
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()  # the adapters added into the base weights: the fused path runs the bases alone
    merged, reference_merged = both()
    torch.testing.assert_close(merged, reference_merged, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged, fused, rtol=1e-4, atol=1e-5)
    model.disable_adapters()  # (peft unmerges first)
    disabled, reference_disabled = both()
    torch.testing.assert_close(disabled, reference_disabled, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(disabled, fused, atol=1e-4)  # the adapters did change the output


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(8, 6), nn.Linear(8, 3)


@pytest.mark.parametrize("why", ["lora dropout while training", "a forward hook", "a backward hook", "DoRA",
                                 "a LoRA bias", "bf16 base, fp32 LoRA, no autocast"])
def test_layers_it_cannot_fuse_exactly_run_one_by_one(why):
    torch.manual_seed(0)
    module, x = TwoLayers(), torch.randn(2, 5, 8)
    config = peft.LoraConfig(r=2, target_modules=["first", "second"], init_lora_weights="gaussian")
    if why == "lora dropout while training":
        config.lora_dropout = 0.5
    config.use_dora, config.lora_bias = why == "DoRA", why == "a LoRA bias"
    if why == "bf16 base, fp32 LoRA, no autocast":  # peft casts the input to each adapter's dtype itself
        module, x = module.to(torch.bfloat16), x.to(torch.bfloat16)
    module = peft.inject_adapter_in_model(config, module).train()
    if why == "bf16 base, fp32 LoRA, no autocast":
        for name, param in module.named_parameters():
            param.data = param.data.float() if "lora_" in name else param.data
    if why == "a forward hook":
        module.second.register_forward_pre_hook(lambda layer, args: None)
    if why == "a backward hook":
        module.second.base_layer.register_full_backward_hook(lambda layer, grad_in, grad_out: None)
    layers = [module.first, module.second]
    with OpCount(MATMULS) as count:
        outputs = fused_linears(x, layers)
    with OpCount(MATMULS) as one_by_one:
        expected = [layer(x) for layer in layers]
    assert count.count == one_by_one.count >= 2 * 3  # (at least a base, A and B matmul per layer)
    if why != "lora dropout while training":  # (fresh dropout masks each call)
        for output, reference in zip(outputs, expected):
            torch.testing.assert_close(output, reference)


def test_plain_layers_fuse_into_one_matmul():
    module, x = TwoLayers(), torch.randn(2, 5, 8)
    with OpCount(MATMULS) as count:
        outputs = fused_linears(x, [module.first, module.second])
    assert count.count == 1
    for output, layer in zip(outputs, [module.first, module.second]):
        torch.testing.assert_close(output, layer(x))
