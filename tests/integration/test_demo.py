"""The demo maker's output (a loadable diffusers folder with the trained VAE, real captioned 24 fps clips) and
the demo VAE's training."""

import json

import decord
import numpy as np
import torch
from diffusers import AutoencoderKLWan

from happyhorse_train.demo.autoencoder import load_trained_vae, measure
from happyhorse_train.demo.clips import DEMO_CLIPS, render_clip
from happyhorse_train.demo.random_model import build_random_pipeline
from happyhorse_train.models.happyhorse import HappyHorsePipeline
from happyhorse_train.models.presets import load_preset
from tests.conftest import run_script


def test_make_demo_writes_a_model_folder_and_captioned_clips(tmp_path):
    result = run_script("data_tools/make_demo.py", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr

    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "HappyHorsePipeline"
    assert {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)

    for recipe in DEMO_CLIPS:
        reader = decord.VideoReader(str(tmp_path / "clips" / f"{recipe.name}.mp4"))
        assert len(reader) == recipe.num_frames
        assert reader.get_avg_fps() == 24
        first = reader[0].asnumpy()
        assert first.shape == (recipe.height, recipe.width, 3)
        caption = (tmp_path / "clips" / f"{recipe.name}.txt").read_text().strip()
        assert caption == recipe.caption
        assert all(word in caption for word in (recipe.colour, recipe.shape, recipe.background))
        # The decoded frame is the one drawn (H.264 blurs edges a little).
        assert np.abs(first / 255 - render_clip(recipe)[0]).mean() < 0.02
    assert "trained VAE" in result.stdout
    # The clips differ in every way their captions say: colour, shape, motion, background.
    for field in ("colour", "shape", "motion", "background"):
        assert len({getattr(recipe, field) for recipe in DEMO_CLIPS}) >= 3, field


def test_pipeline_save_and_load_round_trip_renders_identical_frames(tmp_path):
    pipe = build_random_pipeline("tiny", seed=5)
    pipe.save_pretrained(tmp_path / "model")
    loaded = HappyHorsePipeline.from_pretrained(tmp_path / "model")
    kwargs = dict(height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=3.0, max_sequence_length=32)
    frames = [p("a green circle", generator=torch.Generator().manual_seed(0), **kwargs).frames for p in (pipe, loaded)]
    assert np.array_equal(frames[0], frames[1])


def test_the_committed_demo_vae_reconstructs_the_demo_clips_faithfully():
    vae = load_trained_vae(load_preset("tiny")["vae"])
    report = measure(vae, DEMO_CLIPS)
    # Measured: MSE 0.0032 against a pixel variance of 0.0195 (a random VAE: 0.77 against 0.026).
    assert report["reconstruction_mse"] < 0.25 * report["pixel_variance"], report
    # The normalization statistics written with it are this VAE's, on these clips.
    assert np.allclose(vae.config.latents_mean, report["latents_mean"], atol=1e-4)
    assert np.allclose(vae.config.latents_std, report["latents_std"], atol=1e-4)


def test_train_demo_vae_writes_a_loadable_vae_and_its_report(tmp_path):
    result = run_script("data_tools/train_demo_vae.py", "--steps", "2", "1", "1", "--out", str(tmp_path / "vae"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "vae" / "training_report.json").read_text())
    assert report["steps"] == {"5": 2, "9": 1, "17": 1}
    vae = AutoencoderKLWan.from_pretrained(tmp_path / "vae")
    assert len(vae.config.latents_std) == vae.config.z_dim
    assert "demo-clip reconstruction MSE" in result.stdout
