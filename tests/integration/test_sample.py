"""sample.py and HappyHorsePipeline on the tiny demo checkpoint: videos on disk, LoRAs, and clear errors."""

from __future__ import annotations

import re

import decord
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from happyhorse_train.config import SampleMemoryConfig
from happyhorse_train.demo.random_model import write_random_model
from happyhorse_train.errors import UserInputError
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.happyhorse import load_pipeline
from happyhorse_train.models.presets import load_preset
from happyhorse_train.rendering.sample_pipeline import apply_loras, load_inference_pipeline
from tests.conftest import make_random_lora, run_script

SIZE = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=32)
PROMPT = "a red circle moving left to right on a dark background"
HAPPYHORSE = get_spec("happyhorse")


@pytest.fixture(scope="module")
def loras(demo_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return [make_random_lora(demo_model_dir, folder / name, seed) for name, seed in (("a", 1), ("b", 2))]


def render(pipe, seed: int = 0) -> np.ndarray:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **SIZE).frames


def read_video(path) -> np.ndarray:
    reader = decord.VideoReader(str(path))
    return reader.get_batch(range(len(reader))).asnumpy()


def test_sample_py_writes_a_decodable_video_and_a_lora_changes_it(demo_model_dir, loras, tmp_path):
    common = [f"model.path={demo_model_dir}", "height=48", "width=64", "num_frames=9", "num_inference_steps=4"]
    plain = run_script("sample.py", *common, f"output_dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr
    with_lora = run_script("sample.py", *common, f"output_dir={tmp_path / 'lora'}", f"loras=[{loras[0]}]")
    assert with_lora.returncode == 0, with_lora.stderr

    [plain_path] = (tmp_path / "plain").glob("*.mp4")
    [lora_path] = (tmp_path / "lora").glob("*.mp4")
    assert f"wrote {plain_path}" in plain.stdout
    plain_frames, lora_frames = read_video(plain_path), read_video(lora_path)
    assert plain_frames.shape == (9, 48, 64, 3)
    assert np.abs(plain_frames.astype(int) - lora_frames.astype(int)).mean() > 1.0


def test_same_seed_gives_the_same_video_and_another_seed_does_not(demo_model_dir):
    pipe = load_pipeline(demo_model_dir, torch.device("cpu"), torch.float32)
    first, again, other = render(pipe, 0), render(pipe, 0), render(pipe, 1)
    assert np.array_equal(first, again)
    assert not np.allclose(first, other, atol=1e-3)


def test_fused_lora_matches_unfused_lora(demo_model_dir, loras):
    pipe = load_pipeline(demo_model_dir, torch.device("cpu"), torch.float32)
    base = render(pipe)
    apply_loras(pipe, HAPPYHORSE, [str(loras[0])], [0.7])
    unfused = render(pipe)
    pipe.fuse_lora(lora_scale=1.0)
    fused = render(pipe)
    pipe.unfuse_lora()
    unfused_again = render(pipe)
    assert np.abs(unfused - base).mean() > 1e-3
    np.testing.assert_allclose(fused, unfused, atol=1e-4)
    np.testing.assert_allclose(unfused_again, unfused, atol=1e-4)


def test_two_loras_combine_with_their_weights(demo_model_dir, loras):
    pipe = load_pipeline(demo_model_dir, torch.device("cpu"), torch.float32)
    names = apply_loras(pipe, HAPPYHORSE, [str(p) for p in loras], [1.0, 1.0])
    both = render(pipe)
    pipe.set_adapters(names, adapter_weights=[1.0, 0.0])
    only_a = render(pipe)
    pipe.set_adapters(names, adapter_weights=[0.0, 1.0])
    only_b = render(pipe)

    alone = load_pipeline(demo_model_dir, torch.device("cpu"), torch.float32)
    apply_loras(alone, HAPPYHORSE, [str(loras[0])], [])
    np.testing.assert_allclose(only_a, render(alone), atol=1e-5)  # weight 0 switches an adapter off
    assert np.abs(both - only_a).mean() > 1e-3 and np.abs(both - only_b).mean() > 1e-3


def test_a_lora_of_another_model_is_refused_with_a_clear_message(tmp_path, demo_model_dir):
    other_dir = tmp_path / "other"
    wider_mlp = load_preset("tiny")
    wider_mlp["transformer"]["ffn_dim"] = 96
    write_random_model(other_dir, wider_mlp)
    foreign = make_random_lora(other_dir, tmp_path / "foreign", seed=3)

    result = run_script("sample.py", f"model.path={demo_model_dir}", f"loras=[{foreign}]", f"output_dir={tmp_path}")
    assert result.returncode == 2
    assert "does not fit this model" in result.stderr and "LoRA maps 64->96 features" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.path={missing}", "model folder not found"),
        ("model.path={not_a_model}", "is not a diffusers model folder: model_index.json is missing"),
        ("height=50", "height=50 does not fit the model: it must be a multiple of 16"),
        ("num_frames=10", "num_frames=10 is not of the form 4k+1"),
        ("loras=[{missing}/x.safetensors]", "LoRA file not found"),
    ],
)
def test_bad_input_gets_one_clear_line(override, message, demo_model_dir, tmp_path):
    (tmp_path / "not_a_model").mkdir()
    override = override.format(missing=tmp_path / "missing", not_a_model=tmp_path / "not_a_model")
    result = run_script("sample.py", f"model.path={demo_model_dir}", override, f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.mp4"))


def test_a_config_typo_is_named_before_anything_loads(demo_model_dir):
    result = run_script("sample.py", f"model.path={demo_model_dir}", "num_inference_stepz=3")
    assert result.returncode != 0
    assert "num_inference_stepz" in result.stderr and "not in 'SampleConfig'" in result.stderr


def test_pipeline_raises_user_input_error_for_a_bad_size(demo_model_dir):
    pipe = load_pipeline(demo_model_dir, torch.device("cpu"), torch.float32)
    with pytest.raises(UserInputError, match="width=40"):
        pipe(PROMPT, **{**SIZE, "width": 40})


def test_memory_settings_render_what_the_plain_pipeline_renders(demo_model_dir):
    spec = get_spec("happyhorse")
    plain = render(load_pipeline(demo_model_dir, torch.device("cpu"), torch.float32))

    log = []
    cpu = torch.device("cpu")
    swapped = load_inference_pipeline(
        spec, demo_model_dir, cpu, torch.float32, memory(blocks_to_swap=2), compile=False, log=log.append
    )
    np.testing.assert_allclose(render(swapped), plain, atol=1e-6)
    assert "block swap: blocks [0, 2] live in host RAM, streamed in ahead of use" in log

    chunked = load_inference_pipeline(
        spec, demo_model_dir, cpu, torch.float32, memory(ffn_chunk_tokens=16), compile=False
    )
    np.testing.assert_allclose(render(chunked), plain, atol=1e-6)  # shared blocks see 27 tokens: 2 chunks

    log.clear()
    fp8 = load_inference_pipeline(
        spec, demo_model_dir, cpu, torch.float32, memory(base_weights="fp8"), compile=False, log=log.append
    )
    difference = np.abs(render(fp8) - plain)
    assert any("loaded transformer (fp8)" in line for line in log)
    print(f"fp8 base: mean |frame difference| {difference.mean():.2e}")
    assert 0 < difference.mean() < 0.01, difference.mean()


def test_compiled_blocks_render_what_eager_blocks_render(demo_model_dir):
    spec = get_spec("happyhorse")
    eager = render(load_pipeline(demo_model_dir, torch.device("cpu"), torch.float32))
    compiled = load_inference_pipeline(spec, demo_model_dir, torch.device("cpu"), torch.float32, memory(), compile=True)
    torch._dynamo.utils.counters.clear()
    np.testing.assert_allclose(render(compiled), eager, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled


def test_memory_settings_that_exclude_each_other_are_refused_together():
    settings = memory(offload_models=True, blocks_to_swap=2, base_weights="fp4", ffn_chunk_tokens=-1)
    with pytest.raises(UserInputError) as refused:  # raised before anything loads; sample.py exits 2 with it
        load_inference_pipeline(get_spec("happyhorse"), "no/such/model", torch.device("cpu"), torch.float32,
                                settings, compile=True)
    message = str(refused.value)
    assert "memory.base_weights='fp4': use one of bf16, int8, nf4, fp8, fp8-block" in message
    assert "memory.offload_models moves the whole transformer on and off the GPU" in message
    assert "memory.ffn_chunk_tokens=-1: must be 0 (off) or more" in message
    assert "compile: block swap moves weights from hooks inside the blocks" in message


def memory(**settings):
    return OmegaConf.structured(SampleMemoryConfig(**settings))


def test_a_comfyui_file_named_by_weight_name_gets_the_converter_named(demo_model_dir, loras, tmp_path):
    from safetensors.torch import load_file, save_file

    comfy = tmp_path / "comfyui_lora.safetensors"
    save_file(HAPPYHORSE.lora_to_comfyui(load_file(loras[0]), alpha=4.0), str(comfy))
    pipe = load_pipeline(demo_model_dir, torch.device("cpu"), torch.float32)
    with pytest.raises(UserInputError, match=rf"{re.escape(str(comfy))} is in ComfyUI's layout.*convert_lora\.py"):
        pipe.load_lora_weights(tmp_path, weight_name="comfyui_lora.safetensors")
