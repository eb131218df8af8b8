"""The demo maker's output: a loadable diffusers folder and real, captioned 24 fps clips."""

import json

import decord
import numpy as np
import torch

from happyhorse_train.demo.clips import COLOURS, DEMO_CLIPS
from happyhorse_train.demo.random_model import build_random_pipeline
from happyhorse_train.models.happyhorse import HappyHorsePipeline
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
        assert caption == recipe.caption and recipe.colour in caption
        # The shape drawn has the caption's colour: its brightest channel is the colour's.
        shape_pixels = first[first.max(axis=-1) > 100]
        assert shape_pixels.mean(axis=0).argmax() == np.argmax(COLOURS[recipe.colour])


def test_pipeline_save_and_load_round_trip_renders_identical_frames(tmp_path):
    pipe = build_random_pipeline("tiny", seed=5)
    pipe.save_pretrained(tmp_path / "model")
    loaded = HappyHorsePipeline.from_pretrained(tmp_path / "model")
    kwargs = dict(height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=3.0, max_sequence_length=32)
    frames = [p("a green circle", generator=torch.Generator().manual_seed(0), **kwargs).frames for p in (pipe, loaded)]
    assert np.array_equal(frames[0], frames[1])
