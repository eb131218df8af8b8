import pytest
import torch

from happyhorse_train.errors import UserInputError
from happyhorse_train.models import lora_formats as formats
from happyhorse_train.models.backbones import get_spec


def random_lora(modules: list[str], rank: int = 4) -> dict[str, torch.Tensor]:
    tensors = {}
    for module in modules:
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, 8)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(8, rank)
    return tensors


@pytest.mark.parametrize(
    "backbone, module, comfy_module",
    [
        ("wan", "blocks.3.attn1.to_out.0", "blocks.3.self_attn.o"),
        ("wan", "blocks.0.attn2.to_k", "blocks.0.cross_attn.k"),
        ("wan", "blocks.1.ffn.net.0.proj", "blocks.1.ffn.0"),
        ("wan", "proj_out", "head.head"),
        ("wan", "condition_embedder.time_embedder.linear_2", "time_embedding.2"),
        ("happyhorse", "blocks.0.text.attn.to_out", "blocks.0.text.attn.to_out"),  # ComfyUI has no native names for it
    ],
)
def test_key_rules_and_exact_round_trip(backbone, module, comfy_module):
    renames = get_spec(backbone).comfyui_renames
    lora = random_lora([module, "blocks.9.attn1.to_q" if backbone == "wan" else "blocks.9.shared.ff.up_proj"])
    comfy = formats.diffusers_to_comfyui(lora, alpha=2.0, renames=renames)
    comfy_prefix, diffusers_prefix = f"diffusion_model.{comfy_module}", f"transformer.{module}"
    assert torch.equal(comfy[f"{comfy_prefix}.lora_down.weight"], lora[f"{diffusers_prefix}.lora_A.weight"])
    assert torch.equal(comfy[f"{comfy_prefix}.lora_up.weight"], lora[f"{diffusers_prefix}.lora_B.weight"])
    assert comfy[f"diffusion_model.{comfy_module}.alpha"].item() == 2.0
    back, alpha = formats.comfyui_to_diffusers(comfy, renames)
    assert alpha == 2.0 and back.keys() == lora.keys() and all(torch.equal(back[k], lora[k]) for k in lora)


def test_renames_touch_whole_segments_only():
    renames = get_spec("wan").comfyui_renames
    assert formats._rename("blocks.1.attn1.to_q", renames) == "blocks.1.self_attn.q"
    assert formats._rename("blocks.1.attn10.to_q", renames) == "blocks.1.attn10.to_q"  # not a prefix match


def test_mixed_alphas_and_foreign_keys_are_refused():
    comfy = formats.diffusers_to_comfyui(random_lora(["a", "b"]), 1.0, [])
    comfy["diffusion_model.b.alpha"] = torch.tensor(3.0)
    with pytest.raises(UserInputError, match="different alphas"):
        formats.comfyui_to_diffusers(comfy, [])
    with pytest.raises(UserInputError, match="not a ComfyUI LoRA key"):
        formats.comfyui_to_diffusers({"lora_unet_x.lora_down.weight": torch.zeros(1)}, [])


def test_keys_a_layout_cannot_hold_are_refused_by_name():
    dora = {**random_lora(["a"]), "transformer.a.lora_magnitude_vector": torch.ones(4)}
    with pytest.raises(UserInputError, match="'transformer.a.lora_magnitude_vector' is not a LoRA A or B weight"):
        formats.diffusers_to_comfyui(dora, 1.0, [])
    with pytest.raises(UserInputError, match="no lora_down weights: not a LoRA"):
        formats.comfyui_to_diffusers({"diffusion_model.a.alpha": torch.tensor(1.0)}, [])


def test_wan_layers_outside_the_blocks_carry_their_scale_folded_in_and_no_alpha():
    # diffusers' converter of the original layout leaves a non-block alpha key over and refuses the file;
    # ComfyUI reads a layer with no alpha at scale 1. Folding alpha / rank into lora_up suits both.
    spec = get_spec("wan")
    lora = random_lora(["proj_out", "condition_embedder.time_proj", "blocks.0.attn1.to_q"], rank=4)
    comfy = spec.lora_to_comfyui(lora, alpha=16.0)
    assert "diffusion_model.head.head.alpha" not in comfy and "diffusion_model.time_projection.1.alpha" not in comfy
    assert comfy["diffusion_model.blocks.0.self_attn.q.alpha"].item() == 16.0
    head, proj_out = "diffusion_model.head.head", "transformer.proj_out"
    update_theirs = comfy[f"{head}.lora_up.weight"] @ comfy[f"{head}.lora_down.weight"]
    update_ours = (16.0 / 4) * lora[f"{proj_out}.lora_B.weight"] @ lora[f"{proj_out}.lora_A.weight"]
    torch.testing.assert_close(update_theirs, update_ours)
    back, alpha = spec.lora_from_comfyui(comfy)
    assert alpha == 16.0 and all(torch.equal(back[k], lora[k]) for k in lora)  # exact: 16 / 4 is a power of two


def test_a_layer_comfyui_has_no_name_for_is_refused_by_name():
    with pytest.raises(UserInputError, match="'condition_embedder.image_embedder.ff.net.0.proj' has no name in Comfy"):
        get_spec("wan").lora_to_comfyui(random_lora(["condition_embedder.image_embedder.ff.net.0.proj"]), 1.0)


def test_layouts_are_told_apart_and_a_comfyui_file_for_a_diffusers_loader_names_the_converter():
    lora = random_lora(["blocks.0.attn1.to_q"])
    comfy = get_spec("wan").lora_to_comfyui(lora, 1.0)
    assert formats.lora_layout(lora) == "diffusers" and formats.lora_layout(comfy) == "comfyui"
    assert formats.lora_layout({"lora_unet_blocks_0.lora_down.weight": torch.zeros(1)}) is None
    with pytest.raises(UserInputError, match=r"x\.safetensors is in ComfyUI's layout.*data_tools/convert_lora\.py"):
        formats.check_lora_matches(comfy, torch.nn.Linear(8, 8), "x.safetensors")
