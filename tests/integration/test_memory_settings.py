"""train.py with the memory settings on the tiny model: quantized base, offloaded activations, block swap."""

from __future__ import annotations

import pytest
import torch

from happyhorse_train.memory.streamed_load import base_transformer, place_transformer
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.training.run_log import read_metrics
from tests.integration.test_train import train


@pytest.mark.parametrize("base_weights", ["fp8", "nf4"])
def test_a_quantized_base_with_offloaded_activations_and_block_swap_trains_and_validates(
    base_weights, dataset, demo_model_dir, tmp_path
):
    result = train(
        f"model.path={demo_model_dir}", f"data.dataset={dataset}", f"output_dir={tmp_path}", "trainer.max_steps=2",
        f"memory.base_weights={base_weights}", "memory.offload_activations=true", "memory.blocks_to_swap=2",
        "validation.every=2", "validation.prompts=[a red circle]", "validation.num_inference_steps=2",
        "validation.height=32", "validation.width=48", "validation.num_frames=5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded transformer ({base_weights}): 40 linear layers quantized" in result.stdout
    assert "block swap: blocks [0, 2] live in host RAM" in result.stdout
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert list((tmp_path / "validation" / "step-00000002").glob("*.mp4"))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 2 and all(0 < row["host_ram_peak_gb"] < 64 for row in rows)


def test_memory_settings_that_cannot_work_are_refused_together_before_loading(dataset, demo_model_dir, tmp_path):
    result = train(
        f"model.path={demo_model_dir}", f"data.dataset={dataset}", f"output_dir={tmp_path}", "trainer.mode=full",
        "memory.base_weights=nf4", "memory.offload_activations=true", "trainer.gradient_checkpointing=false",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "memory.base_weights=nf4: quantized base weights are frozen; use trainer.mode=lora" in result.stderr
    assert "memory.offload_activations needs trainer.gradient_checkpointing=true" in result.stderr
    assert "Loading pipeline components" not in result.stderr


def test_the_trainer_loads_the_transformer_into_host_ram_while_the_encoders_go_to_the_device(demo_model_dir):
    # The meta device stands in for the GPU: what moved there is visible without one.
    spec = get_spec("happyhorse")
    pipe = spec.load_pipeline(demo_model_dir, torch.device("meta"), torch.float32, transformer_to_device=False)
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cpu"}
    assert {p.device.type for p in pipe.text_encoder.parameters()} == {"meta"}
    assert {p.device.type for p in pipe.vae.parameters()} == {"meta"}


def test_a_quantized_transformer_is_only_loaded_once_the_encoders_are_done(demo_model_dir):
    spec, cpu = get_spec("happyhorse"), torch.device("cpu")
    meta = base_transformer(spec, demo_model_dir, "fp8", cpu, torch.float32, deferred=True)
    pipe = spec.load_pipeline(demo_model_dir, cpu, torch.float32, meta, transformer_to_device=False)
    assert {p.device.type for p in pipe.transformer.parameters()} == {"meta"}  # config only, for the geometry
    assert tuple(pipe.transformer.config.patch_size) == (1, 2, 2)
    lines = []
    place_transformer(pipe, spec, demo_model_dir, "fp8", cpu, torch.float32, lines.append)
    assert {p.device.type for p in pipe.transformer.parameters()} == {"cpu"}
    assert "loaded transformer (fp8): 40 linear layers quantized" in lines[0]
