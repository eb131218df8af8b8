"""diffusers' Wan behind the same boundary: trained by the same loop, its LoRA loaded by diffusers itself."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import load_file

from happyhorse_train.models.backbones import get_spec
from happyhorse_train.training.adapters import make_trainable
from tests.conftest import run_script
from tests.integration.conftest import FAST
from tests.integration.test_train import losses

RENDER = dict(height=32, width=64, num_frames=5, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=32)
PROMPT = "a blue square moving top to bottom on a dark background"


@pytest.fixture(scope="module")
def wan_model(wan_model_dir) -> Path:
    return wan_model_dir


@pytest.fixture(scope="module")
def wan_run(wan_model, tmp_path_factory) -> Path:
    from happyhorse_train.demo.clips import DEMO_CLIPS
    from tests.integration.conftest import make_dataset

    dataset = make_dataset(tmp_path_factory.mktemp("wan_data"), DEMO_CLIPS)
    out = tmp_path_factory.mktemp("wan_run")
    result = run_script(
        "train.py", "+experiment=demo", "model=wan-tiny", f"model.path={wan_model}", f"data.dataset={dataset}",
        f"output_dir={out}", "trainer.max_steps=4", "optimizer.lr=3e-2", "lora.save_formats=[diffusers,comfyui]", *FAST,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(losses(out)) == 4
    return out


def render(pipe) -> np.ndarray:
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **RENDER).frames


def test_diffusers_wan_pipeline_loads_our_lora_and_renders_what_training_had(wan_model, wan_run):
    # The outside client: diffusers' own loader, not our code.
    theirs = WanPipeline.from_pretrained(wan_model)
    theirs.load_lora_weights(str(wan_run / "lora"))
    from_file = render(theirs)

    # Ours: the adapter as training held it, restored from the final checkpoint into a fresh peft injection.
    spec = get_spec("wan", max_sequence_length=32)
    ours = spec.load_pipeline(wan_model, torch.device("cpu"), torch.float32)
    lora = SimpleNamespace(rank=8, alpha=8.0, dropout=0.0, target_modules=None, init="default")  # the demo experiment's
    make_trainable(ours.transformer, "lora", lora, spec, torch.float32)
    trained = load_file(wan_run / "checkpoints" / "step-00000004" / "trainable.safetensors")
    params = dict(ours.transformer.named_parameters())
    with torch.no_grad():
        for name, tensor in trained.items():
            params[name].copy_(tensor)
    ours.transformer.eval()
    live = render(ours)

    base = render(WanPipeline.from_pretrained(wan_model))
    assert np.abs(from_file - base).mean() > 1e-3  # the LoRA does something
    np.testing.assert_allclose(from_file, live, atol=1e-5)


def test_sample_py_renders_wan_with_the_lora(wan_model, wan_run, tmp_path):
    result = run_script(
        "sample.py", "model=wan-tiny", f"model.path={wan_model}", f"loras=[{wan_run / 'lora'}]",
        "height=32", "width=64", "num_frames=5", "num_inference_steps=2", f"output_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.glob("*.mp4"))) == 1


def test_our_comfyui_file_loads_through_diffusers_own_converter_with_the_same_frames(wan_model, wan_run):
    # diffusers converts original/ComfyUI-layout Wan LoRAs itself (lora_conversion_utils): a second outside check.
    comfy = WanPipeline.from_pretrained(wan_model)
    comfy.load_lora_weights(str(wan_run / "lora"), weight_name="comfyui_lora.safetensors")
    native = WanPipeline.from_pretrained(wan_model)
    native.load_lora_weights(str(wan_run / "lora"))
    np.testing.assert_allclose(render(comfy), render(native), atol=1e-5)


def test_convert_cli_round_trip_is_exact(wan_run, tmp_path):
    original = wan_run / "lora" / "pytorch_lora_weights.safetensors"
    convert = "data_tools/convert_lora.py"
    to_comfy = run_script(convert, str(original), str(tmp_path / "c.safetensors"), "--to", "comfyui")
    assert to_comfy.returncode == 0, to_comfy.stderr
    back = run_script(convert, str(tmp_path / "c.safetensors"), str(tmp_path / "back"), "--to", "diffusers",
                      "--backbone", "wan")
    assert back.returncode == 0, back.stderr
    a, b = load_file(original), load_file(tmp_path / "back" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    comfy_cli = load_file(tmp_path / "c.safetensors")
    comfy_trained = load_file(wan_run / "lora" / "comfyui_lora.safetensors")
    assert comfy_cli.keys() == comfy_trained.keys()
    assert all(torch.equal(comfy_cli[k], comfy_trained[k]) for k in comfy_cli)
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in comfy_cli

    from safetensors.torch import save_file

    save_file(comfy_cli, str(tmp_path / "foreign.safetensors"))  # as another tool would write it: no header of ours
    no_backbone = run_script(convert, str(tmp_path / "foreign.safetensors"), str(tmp_path / "x"), "--to", "diffusers")
    assert no_backbone.returncode == 2 and "--backbone" in no_backbone.stderr
