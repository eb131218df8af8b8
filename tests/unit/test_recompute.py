"""Selective checkpointing: blocks that keep their attention output give the same gradients as full
checkpointing, and their attention kernels really run once instead of twice."""

import pytest
import torch
from omegaconf import OmegaConf

from happyhorse_train.memory.offload import repeated_blocks
from happyhorse_train.memory.recompute import ATTENTION_OPS, BlockCheckpointing
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.presets import CONFIG_DIR
from happyhorse_train.training.adapters import make_trainable
from tests.op_count import OpCount
from tests.unit.test_transformer import tiny_inputs, tiny_transformer


def lora_model():
    model = tiny_transformer()
    lora = OmegaConf.load(CONFIG_DIR / "lora" / "default.yaml")
    lora.rank, lora.dropout = 4, 0.0
    torch.manual_seed(1)
    make_trainable(model, "lora", lora, get_spec("happyhorse"), torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # LoRA B starts at zero: random adapters give every adapter a gradient
                param.normal_(0, 0.02)
    return model.train()


def gradients_and_kernel_count(saved_attention_blocks: int):
    model = lora_model()
    checkpointing = BlockCheckpointing(repeated_blocks(model), saved_attention_blocks, compiled=False)
    model.enable_gradient_checkpointing(checkpointing)
    latents, text, timestep = tiny_inputs()
    with OpCount(ATTENTION_OPS) as counter:
        model(latents, text, timestep).sample.square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}, counter.count


@pytest.mark.parametrize("saved", [1, 3])
def test_kept_attention_gives_the_same_gradients_and_is_not_recomputed(saved):
    reference, full_count = gradients_and_kernel_count(0)
    grads, count = gradients_and_kernel_count(saved)
    assert full_count == 2 * 3  # 3 blocks: forward, then again in the backward
    assert count == 3 + (3 - saved)
    assert grads.keys() == reference.keys() and len(grads) > 20
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=0, atol=0, msg=name)
