"""train.py with the speed settings on the tiny model: compiled blocks and kept attention outputs train the
same run as the plain eager one. (Rendering through compiled blocks: tests/integration/test_sample.py.)"""

from __future__ import annotations

import pytest

from tests.integration.test_train import losses, train


def test_compiled_blocks_with_kept_attention_train_as_the_eager_run(dataset, demo_model_dir, tmp_path):
    common = [f"model.path={demo_model_dir}", f"data.dataset={dataset}", "trainer.max_steps=3", "lora.dropout=0.0"]
    eager = train(*common, f"output_dir={tmp_path / 'eager'}")
    assert eager.returncode == 0, eager.stderr[-3000:]
    fast = train(*common, f"output_dir={tmp_path / 'fast'}", "trainer.compile=true", "memory.saved_attention_blocks=2")
    assert fast.returncode == 0, fast.stderr[-3000:]
    assert losses(tmp_path / "fast") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


def test_speed_settings_that_cannot_work_are_refused_before_loading(dataset, demo_model_dir, tmp_path):
    result = train(
        f"model.path={demo_model_dir}", f"data.dataset={dataset}", f"output_dir={tmp_path}", "trainer.compile=true",
        "memory.blocks_to_swap=1", "memory.saved_attention_blocks=-1",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "trainer.compile: block swap moves weights" in result.stderr
    assert "memory.saved_attention_blocks=-1: must be 0 or more" in result.stderr
    assert "Loading pipeline components" not in result.stderr
