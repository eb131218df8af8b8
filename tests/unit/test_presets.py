import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

from happyhorse_train.demo.random_model import build_random_pipeline
from happyhorse_train.errors import UserInputError
from happyhorse_train.models.happyhorse.pipeline import HappyHorsePipeline
from happyhorse_train.models.happyhorse.transformer import HappyHorseTransformer3DModel
from happyhorse_train.models.presets import load_preset


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
