"""The FSDP strategy's checks and settings, on accelerate's real plugin (the 2-process runs are in
tests/integration/test_scale_out.py)."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin

from happyhorse_train.errors import UserInputError
from happyhorse_train.training.distributed import FullyShardedDataParallel, gradient_accumulation
from tests.conftest import train_config


def test_fsdp_refuses_everything_that_needs_whole_weights_or_one_gpu_in_one_message():
    strategy = FullyShardedDataParallel(FullyShardedDataParallelPlugin(fsdp_version=2))
    strategy.check_supported(train_config("validation.every=0", "memory.saved_attention_blocks=2"))  # allowed
    refused = ["trainer.ema=true", "validation.every=5", "memory.base_weights=nf4", "memory.offload_activations=true",
               "trainer.compile=true", "memory.blocks_to_swap=2", "optimizer=adamw8bit"]
    with pytest.raises(UserInputError) as error:
        strategy.check_supported(train_config(*refused))
    message = str(error.value)
    assert message.startswith("not supported with FSDP:")
    for override in refused:
        assert override.split("=")[0] in message or override.split("=")[1] in message, override
    with pytest.raises(UserInputError, match="only FSDP2 is tested"):
        FullyShardedDataParallel(FullyShardedDataParallelPlugin(fsdp_version=1)).check_supported(train_config())


def test_fsdp_reduces_gradients_in_float32_computes_in_the_mixed_precision_dtype_and_leaves_inputs_alone():
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")  # what accelerate does for mixed_precision: bf16
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16
    FullyShardedDataParallel(plugin).configure(train_config())
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    assert plugin.mixed_precision_policy.reduce_dtype == torch.float32
    assert plugin.mixed_precision_policy.cast_forward_inputs is False


def test_under_fsdp_accumulated_gradients_are_reduce_scattered_every_batch(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    fsdp = gradient_accumulation(4)
    assert fsdp.num_steps == 4 and fsdp.sync_each_batch
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert not gradient_accumulation(4).sync_each_batch  # DDP / DeepSpeed: accelerate's skipped syncs
