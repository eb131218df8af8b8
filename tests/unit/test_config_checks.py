"""The training config's value checks, in process (tests/integration/test_train.py checks in a real train.py
process that such a message is one line, before any model loads)."""

from __future__ import annotations

import pytest

from happyhorse_train.errors import UserInputError
from happyhorse_train.training.config_checks import check_train_config
from tests.conftest import train_config

VALIDATION_ON = ("validation.every=5", "validation.prompts=[a]")  # (its checks run only then)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.log_every=0", "trainer.log_every=0: must be greater than 0"),
        ("trainer.mode=half", "trainer.mode='half': use one of lora, full"),
        ("validation.num_frames=10", "validation.num_frames=10: must be 4k+1"),
        ("data.dataset=/nonexistent", "data.dataset=/nonexistent: not a clip dataset folder"),
        ("memory.base_weights=fp4", "memory.base_weights='fp4': use one of bf16, int8, nf4, fp8, fp8-block"),
        ("optimizer.scheduler=step", "optimizer.scheduler='step': use one of constant, linear, cosine"),
        ("lora.init=loftq", "lora.init='loftq': use one of default, gaussian, pissa, olora"),
        ("eval.every=-1", "eval.every=-1: must be 0 or more"),
        ("eval.held_out=1.0", "eval.held_out=1.0: must be in [0, 1)"),
        ("eval.sigmas=[0.5,1.5]", "eval.sigmas=[0.5, 1.5]: give one or more noise levels in (0, 1]"),
        ("eval.sigmas=[]", "eval.sigmas=[]: give one or more noise levels in (0, 1]"),
        ("eval.dataset=/nonexistent", "eval.dataset=/nonexistent: not a clip dataset folder"),
        ("optimizer.betas=[1.5,0.9]", "optimizer.betas=[1.5, 0.9]: give two values in [0, 1)"),
        ("optimizer.eps=-1", "optimizer.eps=-1.0: must be greater than 0"),
        ("optimizer.max_grad_norm=-1", "optimizer.max_grad_norm=-1.0: must be 0 or more"),
        ("optimizer.warmup_steps=-5", "optimizer.warmup_steps=-5: must be 0 or more"),
        ("trainer.checkpoint_every=-1", "trainer.checkpoint_every=-1: must be 0 or more"),
        ("data.num_workers=-1", "data.num_workers=-1: must be 0 or more"),
    ],
)
def test_a_bad_value_is_named_with_what_to_use(override, message, tmp_path):
    with pytest.raises(UserInputError) as error:
        check_train_config(train_config(override, f"output_dir={tmp_path}", *VALIDATION_ON))
    assert message in str(error.value)
