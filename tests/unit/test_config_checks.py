"""The training config's value checks, in process (the subprocess runs in tests/integration/test_train.py check
that their message is one line before any model loads)."""

from __future__ import annotations

import pytest

from happyhorse_train.errors import UserInputError
from happyhorse_train.training.config_checks import check_train_config
from tests.conftest import train_config


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.log_every=0", "trainer.log_every=0: must be greater than 0"),
        ("optimizer.scheduler=step", "optimizer.scheduler='step': use one of constant, linear, cosine"),
        ("lora.init=loftq", "lora.init='loftq': use one of default, gaussian, pissa, olora"),
    ],
)
def test_a_bad_value_is_named_with_what_to_use(override, message, tmp_path):
    with pytest.raises(UserInputError) as error:
        check_train_config(train_config(override, f"output_dir={tmp_path}"))
    assert message in str(error.value)
