"""Two CPU processes under `accelerate launch` (gloo), with the shipped accelerate configs: DDP and DeepSpeed
ZeRO-2/3 train exactly as one process with the same global batch, and a ZeRO checkpoint resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file

from happyhorse_train.demo.clips import DEMO_CLIPS
from tests.conftest import REPO, run_script
from tests.integration.test_train import FAST, losses, make_dataset

ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
# Two clips of one bucket: one process with batch 2 and two processes with batch 1 each see both clips every
# step, and every clip draws its noise from (seed, step, clip), so the two runs compute the same thing.
# Clipping at 0.02 is active (gradient norms: LoRA 0.015-0.034, full 0.7-1.5), the warm-up makes the learning rate move.
EQUIVALENT = ["trainer.max_steps=4", "optimizer.lr=1e-2", "optimizer.warmup_steps=2", "optimizer.max_grad_norm=0.02",
              "data.caption_dropout=0.5", "trainer.checkpoint_every=2"]
# float32 on both sides; what differs is only the order of the reductions (all-reduce / reduce-scatter).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("two_clips"), DEMO_CLIPS[:2])


def launcher(config: str | None) -> list[str]:
    chosen = ["--config_file", str(ACCELERATE_CONFIGS / f"{config}.yaml")] if config else ["--multi_gpu"]
    return ["-m", "accelerate.commands.launch", *chosen, "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]


def run(dataset, model_dir, out, mode, *extra, config=None, processes=1):
    overrides = [f"model.path={model_dir}", f"data.dataset={dataset}", f"output_dir={out}", f"trainer.mode={mode}",
                 f"data.batch_size={2 // processes}", *EQUIVALENT, *extra]
    result = run_script(*(launcher(config) if processes == 2 else []), "train.py", "+experiment=demo", *FAST, *overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def final_weights(out: Path, mode: str) -> dict[str, torch.Tensor]:
    if mode == "lora":
        return load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    return load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")


def assert_same_run(reference: Path, other: Path, mode: str) -> None:
    assert losses(other) == pytest.approx(losses(reference), rel=TOLERANCE)
    expected, got = final_weights(reference, mode), final_weights(other, mode)
    assert sorted(got) == sorted(expected)
    changed = 0
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].float(), tensor.float(), rtol=TOLERANCE, atol=1e-6, msg=name)
        changed += 1
    assert changed > 0


@pytest.fixture(scope="module")
def single_process(two_clips, demo_model_dir, tmp_path_factory) -> dict[str, Path]:
    runs = {}
    for mode in ("lora", "full"):
        runs[mode] = tmp_path_factory.mktemp(f"single_{mode}")
        run(two_clips, demo_model_dir, runs[mode], mode)
    return runs


@pytest.mark.parametrize("config", [None, "deepspeed_zero2", "deepspeed_zero3"], ids=["ddp", "zero2", "zero3"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_processes_train_as_one_with_the_same_global_batch(config, mode, single_process, two_clips, demo_model_dir, tmp_path):
    result = run(two_clips, demo_model_dir, tmp_path, mode, config=config, processes=2)
    assert "2 process(es)" in result.stdout
    if config:
        assert (tmp_path / "checkpoints" / "step-00000004" / "deepspeed").is_dir()
    assert_same_run(single_process[mode], tmp_path, mode)


def test_a_zero3_checkpoint_resumes_to_the_uninterrupted_run(single_process, two_clips, demo_model_dir, tmp_path):
    # Stop after 2 of 4 steps (a checkpoint is written there), then resume from it.
    run(two_clips, demo_model_dir, tmp_path, "lora", "trainer.max_steps=2", config="deepspeed_zero3", processes=2)
    result = run(two_clips, demo_model_dir, tmp_path, "lora", "resume=latest", config="deepspeed_zero3", processes=2)
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert_same_run(single_process["lora"], tmp_path, "lora")


def test_the_offload_config_encodes_trains_and_its_checkpoint_refuses_a_plain_resume(two_clips, demo_model_dir, tmp_path):
    # A cache of its own, so the text encoder and VAE really run under ZeRO-3 (which must not partition them).
    run(two_clips, demo_model_dir, tmp_path, "lora", "trainer.max_steps=2", f"data.cache={tmp_path / 'cache'}",
        config="deepspeed_zero3_offload", processes=2)
    assert len(losses(tmp_path)) == 2
    plain = run_script(*launcher(None), "train.py", "+experiment=demo", *FAST, f"model.path={demo_model_dir}", f"data.dataset={two_clips}",
                       f"output_dir={tmp_path}", "trainer.max_steps=4", "resume=latest")
    assert plain.returncode != 0 and "written by DeepSpeed; this run uses no DeepSpeed" in plain.stderr


def test_zero3_refuses_what_needs_whole_weights_before_training(two_clips, demo_model_dir, tmp_path):
    result = run_script(*launcher("deepspeed_zero3"), "train.py", "+experiment=demo", *FAST, f"model.path={demo_model_dir}",
                        f"data.dataset={two_clips}", f"output_dir={tmp_path}", "trainer.ema=true")
    assert result.returncode != 0  # the launcher reports a failed child as 1; train.py itself exits 2
    assert "not supported with DeepSpeed ZeRO-3" in result.stderr and "trainer.ema" in result.stderr


@pytest.mark.parametrize("path", sorted(ACCELERATE_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_accelerate_config_loads_in_accelerate(path):
    config = load_config_from_file(str(path))
    assert config.distributed_type.value in ("NO", "MULTI_GPU", "DEEPSPEED")
    assert config.mixed_precision == "bf16"
