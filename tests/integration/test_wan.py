"""diffusers' Wan behind the same boundary: trained by the same loop, its LoRA loaded by diffusers itself."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import load_file, save_file

from happyhorse_train.demo.random_model import write_random_model
from happyhorse_train.errors import UserInputError
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.training.adapters import make_trainable
from tests.conftest import make_random_lora, run_script
from tests.integration.conftest import FAST
from tests.integration.test_train import losses

RENDER = dict(height=32, width=64, num_frames=5, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=32)
PROMPT = "a blue square moving top to bottom on a dark background"
# The default targets, and linears outside the blocks (stored differently in ComfyUI's layout), at alpha != rank.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out",
           "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1"]


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
        f"output_dir={out}", "trainer.max_steps=4", "optimizer.lr=3e-2", "lora.alpha=16",
        f"lora.target_modules=[{','.join(TARGETS)}]", *FAST,
    )  # lora.save_formats left at its default, which for Wan writes the ComfyUI file too
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
    lora = SimpleNamespace(rank=8, alpha=16.0, dropout=0.0, target_modules=TARGETS, init="default", save_formats=None)
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
    # diffusers converts original/ComfyUI-layout Wan LoRAs itself (lora_conversion_utils): a second outside check,
    # here with layers outside the blocks, whose alpha keys that converter would refuse.
    keys = load_file(wan_run / "lora" / "comfyui_lora.safetensors").keys()
    assert {"diffusion_model.head.head.lora_up.weight", "diffusion_model.text_embedding.0.lora_down.weight"} <= keys
    assert "diffusion_model.head.head.alpha" not in keys and "diffusion_model.blocks.0.self_attn.q.alpha" in keys
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
    assert all(torch.equal(comfy_cli[k], comfy_trained[k]) for k in comfy_cli)  # folded scale 16 / 8: exact
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in comfy_cli

    save_file(comfy_cli, str(tmp_path / "foreign.safetensors"))  # as another tool would write it: no header of ours
    no_backbone = run_script(convert, str(tmp_path / "foreign.safetensors"), str(tmp_path / "x"), "--to", "diffusers")
    assert no_backbone.returncode == 2 and "--backbone" in no_backbone.stderr


def test_a_lora_of_another_backbone_or_size_is_one_line_before_anything_renders(wan_model, wan_run, tmp_path):
    happyhorse_model = write_random_model(tmp_path / "hh", "tiny", seed=0)
    happyhorse_lora = make_random_lora(happyhorse_model, tmp_path / "hh_lora", seed=1)
    result = run_script(
        "sample.py", "model=wan-tiny", f"model.path={wan_model}", f"loras=[{happyhorse_lora}]", "height=32",
        "width=64", "num_frames=5", "num_inference_steps=2", f"output_dir={tmp_path / 'out'}",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "does not fit this model (WanTransformer3DModel)" in result.stderr and "no linear layer" in result.stderr
    assert not list((tmp_path / "out").glob("*.mp4"))

    # A Wan LoRA of another feed-forward size, in either layout, is named by layer too.
    spec, pipe = get_spec("wan"), WanPipeline.from_pretrained(wan_model)
    narrower = load_file(wan_run / "lora" / "pytorch_lora_weights.safetensors")
    for key, tensor in narrower.items():  # one feature fewer between the two feed-forward linears
        if "ffn.net.0.proj.lora_B" in key:
            narrower[key] = tensor[:-1]
        elif "ffn.net.2.lora_A" in key:
            narrower[key] = tensor[:, :-1]
    for path in (tmp_path / "narrow.safetensors", tmp_path / "narrow_comfy.safetensors"):
        tensors = narrower if path.stem == "narrow" else spec.lora_to_comfyui(narrower, 16.0)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        with pytest.raises(UserInputError, match="ffn.net.0.proj: LoRA maps"):
            spec.check_lora_file(path, pipe.transformer)
