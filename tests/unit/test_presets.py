import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from happyhorse_train.config import register_configs
from happyhorse_train.demo.random_model import build_random_pipeline
from happyhorse_train.errors import UserInputError
from happyhorse_train.models.happyhorse.pipeline import HappyHorsePipeline
from happyhorse_train.models.happyhorse.transformer import HappyHorseTransformer3DModel
from happyhorse_train.models.presets import CONFIG_DIR, load_preset


def test_8b_preset_has_8_billion_parameters():
    with torch.device("meta"):
        model = HappyHorseTransformer3DModel(**load_preset("8b")["transformer"])
    count = sum(p.numel() for p in model.parameters())
    assert 7.5e9 <= count <= 8.5e9, count


def test_8b_geometry_720x480x121_is_16x31x60x90_latents_and_41850_tokens():
    tiny = build_random_pipeline("tiny")
    with torch.device("meta"):
        transformer = HappyHorseTransformer3DModel(**load_preset("8b")["transformer"])
        vae = AutoencoderKLWan()  # the Wan 2.1 VAE geometry the 8b preset uses
    pipe = HappyHorsePipeline(transformer, vae, tiny.text_encoder, tiny.tokenizer, FlowMatchEulerDiscreteScheduler())
    latent = pipe.latent_shape(height=480, width=720, num_frames=121)
    assert latent == (16, 31, 60, 90)
    t, h, w = transformer.latent_grid(latent)
    assert t * h * w == 41_850


def test_tiny_preset_forward_is_fast_enough_to_be_a_test_model():
    tiny = load_preset("tiny")
    model = HappyHorseTransformer3DModel(**tiny["transformer"])
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(UserInputError, match="known presets: .*tiny"):
        load_preset("tinyy")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")))
def test_load_preset_reads_every_preset_as_hydra_composes_it(preset):
    # Presets that build on others (defaults: [8b, _self_]) are read by both: the tools' loader and train.py's.
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={preset}", "data.dataset=unused", "output_dir=unused"])
    composed = OmegaConf.to_container(cfg.model, resolve=True)
    loaded = load_preset(preset)
    assert "defaults" not in loaded
    assert {k: v for k, v in composed.items() if k in loaded or v} == loaded  # the schema adds only empty fields


def test_a_preset_whose_defaults_lack_self_is_refused(tmp_path):
    (tmp_path / "base.yaml").write_text("backbone: happyhorse\ntransformer: {num_layers: 2}\n")
    (tmp_path / "child.yaml").write_text("defaults: [base]\ntransformer: {num_layers: 3}\n")
    with pytest.raises(UserInputError, match="needs _self_"):
        load_preset(tmp_path / "child.yaml")
    (tmp_path / "child.yaml").write_text("defaults: [base, _self_]\ntransformer: {num_layers: 3}\n")
    assert load_preset(tmp_path / "child.yaml") == {"backbone": "happyhorse", "transformer": {"num_layers": 3}}
    (tmp_path / "orphan.yaml").write_text("defaults: [gone, _self_]\n")
    with pytest.raises(UserInputError, match="its defaults name 'gone', but there is no"):
        load_preset(tmp_path / "orphan.yaml")
    (tmp_path / "loop.yaml").write_text("defaults: [loop, _self_]\n")
    with pytest.raises(UserInputError, match="its defaults come back to it"):
        load_preset(tmp_path / "loop.yaml")
