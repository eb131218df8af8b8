"""Two CPU processes under `accelerate launch` (gloo), with the shipped accelerate configs: DDP, DeepSpeed
ZeRO-2/3 and FSDP2 train exactly as one process with the same global batch, and ZeRO and FSDP checkpoints resume.

Each engine is run in both modes (LoRA and full) once; a LoRA run that is stopped and resumed and still matches
the uninterrupted single-process run covers both its equivalence and its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from happyhorse_train.demo.clips import DEMO_CLIPS
from tests.conftest import REPO, run_script
from tests.integration.conftest import FAST, make_dataset
from tests.integration.test_train import eval_losses, losses

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


def launcher(config: str | Path | None) -> list[str]:
    path = ACCELERATE_CONFIGS / f"{config}.yaml" if isinstance(config, str) else config
    chosen = ["--config_file", str(path)] if config else ["--multi_gpu"]
    # accelerate runs FSDP only on GPUs; tests/integration/fsdp_on_cpu.py runs train.py under it on CPUs.
    script = "tests/integration/fsdp_on_cpu.py" if config == "fsdp" else "train.py"
    return ["-m", "accelerate.commands.launch", *chosen, "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", script]


def run(dataset, model_dir, out, mode, *extra, config=None, processes=1):
    overrides = [f"model.path={model_dir}", f"data.dataset={dataset}", f"output_dir={out}", f"trainer.mode={mode}",
                 f"data.batch_size={2 // processes}", *EQUIVALENT, *extra]
    entry = launcher(config) if processes == 2 else ["train.py"]
    result = run_script(*entry, "+experiment=demo", *FAST, *overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def final_weights(out: Path, mode: str) -> dict[str, torch.Tensor]:
    if mode == "lora":
        return load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    return load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")


def assert_same_run(reference: Path, other: Path, mode: str) -> None:
    assert losses(other) == pytest.approx(losses(reference), rel=TOLERANCE)
    # The eval loss before training and after the last step (a resumed run also has one at its first stop).
    expected_evals, got_evals = eval_losses(reference), eval_losses(other)
    assert sorted(expected_evals) == [0, 4] and expected_evals[4] != expected_evals[0]
    assert {step: got_evals[step] for step in expected_evals} == pytest.approx(expected_evals, rel=TOLERANCE)
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


@pytest.fixture
def partitioned_zero3(tmp_path) -> Path:
    """The shipped ZeRO-3 setup, except that every weight is partitioned: DeepSpeed keeps tensors under 100k
    elements whole in every process, and the tiny model has no larger ones, so the shipped config would never
    exercise a sharded weight here."""
    shipped = load_config_from_file(str(ACCELERATE_CONFIGS / "deepspeed_zero3.yaml")).deepspeed_config
    deepspeed = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": shipped["zero3_save_16bit_model"]},
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
    }
    (tmp_path / "deepspeed.json").write_text(json.dumps(deepspeed))
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {tmp_path / 'deepspeed.json'}\n"
        "  zero3_init_flag: false\nnum_machines: 1\nnum_processes: 2\nuse_cpu: false\n"
    )
    return config


@pytest.mark.parametrize(
    "config, mode, extra",
    # A tracker as well in one: its end (accelerate's end_training) ends the process group, so it must come last.
    [(None, "full", ["logging.logger=tensorboard"]), ("deepspeed_zero2", "lora", []), ("deepspeed_zero2", "full", []),
     ("partitioned_zero3", "full", []),
     # Keeping attention outputs (selective checkpointing) recomputes through FSDP's all-gathers.
     ("fsdp", "full", ["memory.saved_attention_blocks=1"])],
    ids=["ddp-full", "zero2-lora", "zero2-full", "zero3-full", "fsdp-full"],
)
def test_two_processes_train_as_one_with_the_same_global_batch(
    config, mode, extra, single_process, two_clips, demo_model_dir, request, tmp_path
):
    if config == "partitioned_zero3":
        config = request.getfixturevalue("partitioned_zero3")
    run_dir = tmp_path / "run"
    result = run(two_clips, demo_model_dir, run_dir, mode, *extra, config=config, processes=2)
    assert "2 process(es)" in result.stdout
    assert_same_run(single_process[mode], run_dir, mode)
    # Each process trained on its own half of the batches and wrote its own random state.
    checkpoint = run_dir / "checkpoints" / "step-00000004"
    assert all((checkpoint / f"rng-rank{rank}.pt").is_file() for rank in (0, 1))
    if "logging.logger=tensorboard" in extra:
        assert list(run_dir.rglob("events.out.tfevents.*"))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["batches_in_epoch"] == 1  # 2 global batches an epoch: 1 per rank


def test_a_zero3_run_stopped_by_its_stop_file_exits_0_and_resumes_to_the_uninterrupted_run(
    single_process, two_clips, demo_model_dir, tmp_path
):
    # A STOP file in output_dir (there from the start here) stops the run after its next step, with a checkpoint,
    # and the launcher exits 0 (`run` asserts it): the clean stop under a launcher, which a signal cannot give.
    (tmp_path / "STOP").touch()
    stopped = run(two_clips, demo_model_dir, tmp_path, "lora", config="deepspeed_zero3", processes=2)
    assert f"stopped by {tmp_path / 'STOP'} at step 1; checkpoint written" in stopped.stdout
    assert (tmp_path / "checkpoints" / "step-00000001" / "deepspeed").is_dir() and not (tmp_path / "STOP").exists()
    result = run(two_clips, demo_model_dir, tmp_path, "lora", "resume=latest", config="deepspeed_zero3", processes=2)
    assert "resumed from" in result.stdout and "at step 1" in result.stdout
    assert_same_run(single_process["lora"], tmp_path, "lora")


def test_an_fsdp_checkpoint_is_sharded_and_resumes_to_the_uninterrupted_run(
    single_process, two_clips, demo_model_dir, tmp_path
):
    run(two_clips, demo_model_dir, tmp_path, "lora", "trainer.max_steps=2", config="fsdp", processes=2)
    checkpoint = tmp_path / "checkpoints" / "step-00000002" / "fsdp"
    saved = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    weights = {name: meta for name, meta in saved.items() if name.startswith("model.")}
    assert weights and all("lora_" in name for name in weights)  # the trainable weights only, not the frozen base
    # Each LoRA matrix was saved as two row shards, one written by each process.
    assert all(len(meta.chunks) == 2 for meta in weights.values())
    assert any(name.startswith("optimizer.state.") for name in saved)
    result = run(two_clips, demo_model_dir, tmp_path, "lora", "resume=latest", config="fsdp", processes=2)
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert_same_run(single_process["lora"], tmp_path, "lora")


def test_fsdp_in_bf16_with_accumulation_trains_as_one_process_does(two_clips, demo_model_dir, tmp_path):
    # bf16 compute (the GPU setting), two batches per step. The first step's loss is the frozen base's forward
    # (LoRA B starts at zero), equal to the single process's only if FSDP passes the float32 timesteps and RoPE
    # tables through uncast: with accelerate's default input casting it differed by 4.6e-4 (measured).
    bf16 = ["trainer.mixed_precision=bf16", "trainer.gradient_accumulation_steps=2", "trainer.checkpoint_every=0"]
    run(two_clips, demo_model_dir, tmp_path / "one", "lora", *bf16)
    run(two_clips, demo_model_dir, tmp_path / "fsdp", "lora", *bf16, config="fsdp", processes=2)
    expected, got = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert got[0] == pytest.approx(expected[0], rel=2e-5)  # measured up to 5.6e-6 (bf16 rounding order, by clip)
    assert got == pytest.approx(expected, rel=1e-3)  # later steps: FSDP computes with the adapter cast to bf16


def test_the_offload_config_encodes_trains_and_its_checkpoint_refuses_a_plain_resume(
    two_clips, demo_model_dir, tmp_path
):
    # A cache of its own, so the text encoder and VAE really run under ZeRO-3 (which must not partition them).
    run(two_clips, demo_model_dir, tmp_path, "lora", "trainer.max_steps=2", f"data.cache={tmp_path / 'cache'}",
        config="deepspeed_zero3_offload", processes=2)
    assert len(losses(tmp_path)) == 2
    plain = run_script(*launcher(None), "+experiment=demo", *FAST, f"model.path={demo_model_dir}",
                       f"data.dataset={two_clips}", "data.batch_size=1",  # 2 clips, 2 processes: 1 each
                       f"output_dir={tmp_path}", "trainer.max_steps=4", "resume=latest")
    assert plain.returncode != 0
    assert "written under deepspeed, this run is replicated (one process or DDP)" in plain.stderr


def test_zero3_refuses_what_needs_whole_weights_before_training(two_clips, demo_model_dir, tmp_path):
    result = run_script(*launcher("deepspeed_zero3"), "+experiment=demo", *FAST, f"model.path={demo_model_dir}",
                        f"data.dataset={two_clips}", f"output_dir={tmp_path}", "trainer.ema=true")
    assert result.returncode != 0  # the launcher reports a failed child as 1; train.py itself exits 2
    assert "not supported with DeepSpeed ZeRO-3" in result.stderr and "trainer.ema" in result.stderr


@pytest.mark.parametrize("path", sorted(ACCELERATE_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_accelerate_config_loads_in_accelerate(path):
    config = load_config_from_file(str(path))
    assert config.distributed_type.value in ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP")
    assert config.mixed_precision == "bf16"
