"""Offloaded activation checkpointing and block swap change where tensors live, never what is computed."""

from __future__ import annotations

import peft
import pytest
import torch
from diffusers import WanTransformer3DModel

from happyhorse_train.memory.offload import BlockSwap, offloaded_checkpoint, repeated_blocks
from happyhorse_train.models.happyhorse.transformer import HappyHorseTransformer3DModel
from happyhorse_train.models.presets import load_preset

TARGETS = ["to_q", "to_k", "to_v", "to_out", "gate_proj", "up_proj", "down_proj"]


def lora_model(dropout: float = 0.0, num_layers: int = 6) -> HappyHorseTransformer3DModel:
    """The tiny model with `num_layers` blocks (the preset's 3: a text+video block, a shared one, another text+video
    one; 6 gives block swap room to spread its swapped blocks) and a LoRA on attention and MLP."""
    torch.manual_seed(0)
    model = HappyHorseTransformer3DModel(**{**load_preset("tiny")["transformer"], "num_layers": num_layers})
    model.requires_grad_(False)
    model.add_adapter(
        peft.LoraConfig(r=4, lora_alpha=4, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights="gaussian")
    )
    return model.train()


def loss_and_grads(model, seed: int = 1, calls: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 16, 3, 8, 12, generator=generator)
    text = torch.randn(2, 5, 32, generator=generator)
    total = 0.0
    for _ in range(calls):  # several steps: block swap must keep working after a backward
        torch.manual_seed(7)  # LoRA dropout draws from the global generator
        loss = model(latents, text, torch.tensor([100.0, 700.0])).sample.square().mean()
        loss.backward()
        total += loss.item()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return total, grads


def assert_same(reference, other):
    assert other[0] == pytest.approx(reference[0], rel=1e-6)
    assert sorted(other[1]) == sorted(reference[1])
    for name, grad in reference[1].items():
        torch.testing.assert_close(other[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(grad.abs().sum() > 0 for grad in reference[1].values())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_offloaded_checkpointing_gives_the_gradients_of_plain_checkpointing(dropout):
    # 3 blocks: one of each kind; the offloaded function runs per block, so more of them repeat the same thing.
    plain = lora_model(dropout, num_layers=3)
    plain.enable_gradient_checkpointing()
    offloaded = lora_model(dropout, num_layers=3)
    offloaded.enable_gradient_checkpointing(gradient_checkpointing_func=offloaded_checkpoint)
    assert_same(loss_and_grads(plain), loss_and_grads(offloaded))


def test_offloaded_checkpointing_trains_every_weight_of_a_full_fine_tune():
    def full(checkpoint_func):
        torch.manual_seed(0)
        model = HappyHorseTransformer3DModel(**load_preset("tiny")["transformer"]).train()
        model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_func)
        return model

    # Inputs that require grad (the time modulation feeds every block) get their gradients too.
    assert_same(loss_and_grads(full(None)), loss_and_grads(full(offloaded_checkpoint)))


def test_offloaded_checkpointing_works_on_diffusers_wan_blocks():
    def wan(checkpoint_func):
        torch.manual_seed(0)
        config = {k: v for k, v in load_preset("wan-tiny")["transformer"].items()}
        model = WanTransformer3DModel(**config).train()
        model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_func)
        return model

    def run(model):
        generator = torch.Generator().manual_seed(3)
        latents = torch.randn(1, model.config.in_channels, 2, 8, 8, generator=generator)
        text = torch.randn(1, 6, model.config.text_dim, generator=generator)
        loss = model(latents, torch.tensor([500]), text).sample.square().mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert_same(run(wan(None)), run(wan(offloaded_checkpoint)))


@pytest.fixture(scope="module")
def plain_checkpointing_runs():
    """The reference for every block-swap case, computed once: the plainly checkpointed LoRA model's loss and
    gradients after 2 steps, and after 2 more (gradients accumulating), as a swapped model is run below."""
    reference = lora_model()
    reference.enable_gradient_checkpointing()
    return loss_and_grads(reference, calls=2), loss_and_grads(reference, calls=2)


@pytest.mark.parametrize("num_swapped", [1, 3, 6])
def test_block_swap_computes_the_same_and_keeps_at_most_two_swapped_blocks_resident(
    num_swapped, plain_checkpointing_runs
):
    while_swapped, after_removal = plain_checkpointing_runs
    swapped = lora_model()
    swapped.enable_gradient_checkpointing(gradient_checkpointing_func=offloaded_checkpoint)
    swap = BlockSwap(repeated_blocks(swapped), num_swapped, torch.device("cpu"))
    assert len(swap.swapped) == num_swapped
    assert_same(while_swapped, loss_and_grads(swapped, calls=2))
    # Forward visits 6 blocks, the backward recomputes 6: 12 block calls a step, 2 steps.
    assert len(swap.resident_counts) == 24
    assert max(swap.resident_counts) <= 2
    swap.remove()
    assert_same(after_removal, loss_and_grads(swapped, calls=2))


def test_block_swap_moves_only_frozen_weights():
    model = lora_model()
    blocks = repeated_blocks(model)
    swap = BlockSwap(blocks, 2, torch.device("cpu"))
    moved = {id(tensor) for index in swap.swapped for _, _, tensor in swap._host[index]}
    trained = [p for i in swap.swapped for p in blocks[i].parameters() if p.requires_grad]
    frozen = [p for i in swap.swapped for p in blocks[i].parameters() if not p.requires_grad]
    assert trained and frozen
    assert all(id(p.data) not in moved for p in trained)
    assert len(moved) >= len(frozen)


def test_repeated_blocks_are_found_through_the_diffusers_marker():
    model = lora_model()
    assert repeated_blocks(model) == list(model.blocks)
    with pytest.raises(ValueError, match="_repeated_blocks"):
        repeated_blocks(torch.nn.Linear(2, 2))
