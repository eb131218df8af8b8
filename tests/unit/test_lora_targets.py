"""The default LoRA targets of every shipped backbone: every adapter tensor gets a gradient from the loss, the layers
whose output cannot reach it are left out (on the tiny presets and, on the meta device, the 8b one), and the file
saved from such a LoRA loads in the backbone's diffusers pipeline exactly, with nothing left over."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from peft.utils import get_peft_model_state_dict

from happyhorse_train.demo.random_model import build_random_pipeline
from happyhorse_train.errors import UserInputError
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.presets import CONFIG_DIR, load_preset
from happyhorse_train.planner.facts import meta_training_transformer
from happyhorse_train.training.adapters import check_layout_names, make_trainable

LORA = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "lora" / "default.yaml"), {"rank": 4})
PRESETS = ["tiny", "wan-tiny"]
# In the last sandwich block only video tokens go on to the output; text tokens reach them only as attention keys
# and values (to_k, to_v), so everything else of the text stream there is dead.
DEAD_IN_LAST_BLOCK = ["attn.to_q", "attn.to_gate", "attn.to_out", "ff.gate_proj", "ff.up_proj", "ff.down_proj"]


def default_lora(preset: str, seed: int = 0):
    """(spec, transformer with the default LoRA, its LoraConfig), lora_B random: at its usual zero, lora_A would
    get no gradient and the adapter would change nothing."""
    spec, transformer = get_spec(load_preset(preset)["backbone"]), build_random_pipeline(preset, seed).transformer
    config = make_trainable(transformer, "lora", LORA, spec, torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return spec, transformer, config


def velocity(spec, transformer, seed: int = 1) -> torch.Tensor:
    """The training forward on a random latent and random text states."""
    config, generator = transformer.config, torch.Generator().manual_seed(seed)
    latents = torch.randn(2, config.in_channels, 3, 8, 8, generator=generator)
    text = torch.randn(2, 7, config.text_dim, generator=generator)
    return spec.predict_velocity(transformer, latents, torch.tensor([300.0, 700.0]), text, None)


def adapted_modules(model: torch.nn.Module) -> set[str]:
    return {name.split(".lora_")[0] for name, _ in model.named_parameters() if ".lora_" in name}


def suffix_matches(model: torch.nn.Module, suffixes: list[str]) -> set[str]:
    """What a plain peft suffix list would adapt (peft's rule: the name, or a name ending in ".suffix")."""
    return {name for name, _ in model.named_modules() if any(name == s or name.endswith(f".{s}") for s in suffixes)}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_default_lora_tensor_gets_a_gradient_in_one_step(preset):
    spec, transformer, _ = default_lora(preset)
    prediction = velocity(spec, transformer)
    target = torch.randn(prediction.shape, generator=torch.Generator().manual_seed(2))
    (prediction - target).square().mean().backward()

    adapters = {name: param for name, param in transformer.named_parameters() if ".lora_" in name}
    assert len(adapters) == 2 * len(adapted_modules(transformer)) > 0
    no_gradient = [name for name, param in adapters.items() if param.grad is None or not param.grad.abs().sum() > 0]
    assert no_gradient == []


def test_the_tiny_happyhorse_leaves_out_the_six_dead_layers_of_its_last_block():
    spec, transformer, _ = default_lora("tiny")
    every_match = suffix_matches(transformer, spec.default_lora_targets)
    last = len(transformer.blocks) - 1
    dead = {f"blocks.{last}.text.{name}" for name in DEAD_IN_LAST_BLOCK}
    assert len(every_match) == 40 and dead <= every_match
    assert adapted_modules(transformer) == every_match - dead  # 68 LoRA tensors, not 80
    assert {f"blocks.{last}.text.attn.to_k", f"blocks.{last}.text.attn.to_v"} <= adapted_modules(transformer)


def test_wan_adapts_every_default_target():
    spec, transformer, _ = default_lora("wan-tiny")
    assert adapted_modules(transformer) == suffix_matches(transformer, spec.default_lora_targets)


def test_the_8b_preset_leaves_out_the_same_layers_of_its_last_block():
    spec, big = get_spec("happyhorse"), meta_training_transformer(load_preset("8b"), lora_rank=32)
    every_match = suffix_matches(big, spec.default_lora_targets)
    last = len(big.blocks) - 1
    dead = {f"blocks.{last}.text.{name}" for name in DEAD_IN_LAST_BLOCK}
    assert (len(every_match), last) == (288, 31) and dead <= every_match
    adapted = adapted_modules(big)
    assert adapted == every_match - dead  # 564 LoRA tensors, not 576
    # the first sandwich blocks and the second-to-last one feed later blocks: their text streams stay adapted
    assert {f"blocks.{last - 1}.text.attn.to_q", "blocks.0.text.ff.down_proj"} <= adapted


def test_a_target_list_given_in_the_config_is_taken_as_it_is():
    given = OmegaConf.merge(LORA, {"target_modules": ["down_proj"]})
    transformer = build_random_pipeline("tiny").transformer
    make_trainable(transformer, "lora", given, get_spec("happyhorse"), torch.float32)
    assert adapted_modules(transformer) == suffix_matches(transformer, ["down_proj"])
    assert "blocks.2.text.ff.down_proj" in adapted_modules(transformer)


@pytest.mark.parametrize("preset", PRESETS)
def test_the_saved_default_lora_loads_in_the_pipeline_with_no_key_left_over(preset, tmp_path):
    spec, trained, config = default_lora(preset)
    saved = get_peft_model_state_dict(trained)
    spec.save_lora(tmp_path, trained, saved, config.to_dict(), {})
    pipe = build_random_pipeline(preset)  # the same seed: the same base weights
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(tmp_path)
    assert [str(w.message) for w in caught if "peft" in w.filename] == []  # e.g. "exclude_modules ... excluded none"
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=next(iter(pipe.transformer.peft_config)))
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[key], saved[key]) for key in saved)
    with torch.no_grad():
        torch.testing.assert_close(velocity(spec, pipe.transformer), velocity(spec, trained.eval()))


def test_a_target_comfyui_has_no_name_for_is_refused_when_training_starts():
    import peft

    model = torch.nn.Sequential(OrderedDict(image_proj=torch.nn.Linear(4, 4)))
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["image_proj"]), model)
    with pytest.raises(UserInputError, match="'image_proj' has no name in ComfyUI's model"):
        check_layout_names(model, SimpleNamespace(save_formats=None), get_spec("wan"))  # Wan's default writes it
    check_layout_names(model, SimpleNamespace(save_formats=["diffusers"]), get_spec("wan"))
    check_layout_names(model, SimpleNamespace(save_formats=None), get_spec("happyhorse"))  # keeps its own names
