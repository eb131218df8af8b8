"""On a GPU: the shipped FSDP config under a plain `accelerate launch` (accelerate's own GPU path, without the
CPU stand-in tests/integration/fsdp_on_cpu.py), bf16 mixed precision, one process: it trains, writes a sharded
checkpoint, resumes from it, and the final LoRA equals the uninterrupted run's. Skips without CUDA."""

import pytest
import torch
from safetensors.torch import load_file

from happyhorse_train.demo.clips import DEMO_CLIPS
from tests.conftest import REPO, run_script
from tests.integration.conftest import make_dataset
from tests.integration.test_train import losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fsdp_on_one_gpu_trains_checkpoints_and_resumes_to_the_uninterrupted_run(demo_model_dir, tmp_path):
    dataset = make_dataset(tmp_path / "data", DEMO_CLIPS[:2])
    launch = ["-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate/fsdp.yaml"),
              "--num_processes", "1", "train.py", "+experiment=demo", f"model.path={demo_model_dir}",
              f"data.dataset={dataset}", "logging.logger=none", "validation.every=0", "trainer.max_steps=4",
              "trainer.checkpoint_every=2", "data.batch_size=2", "trainer.mixed_precision=bf16",
              "memory.saved_attention_blocks=1"]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    for args in ([f"output_dir={whole}"], [f"output_dir={halves}", "trainer.max_steps=2"],
                 [f"output_dir={halves}", "resume=latest"]):
        result = run_script(*launch, *args)
        assert result.returncode == 0, result.stderr[-4000:]
    assert (halves / "checkpoints" / "step-00000002" / "fsdp").is_dir()
    assert losses(halves) == pytest.approx(losses(whole), rel=1e-3)
    expected = load_file(whole / "lora" / "pytorch_lora_weights.safetensors")
    got = load_file(halves / "lora" / "pytorch_lora_weights.safetensors")
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-5, msg=name)
