"""HappyHorse image to video ("first_frame" conditioning): training conditions exactly as the pipeline does, the
oracle checks on both sides, one train.py run, and sample.py image= end to end with its refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from happyhorse_train.data.cache_fill import fill_cache
from happyhorse_train.data.latent_cache import LatentCache, video_entry_key
from happyhorse_train.data.prepare import attach_first_frame, load_manifest, prepare_clips, write_dataset_folder
from happyhorse_train.data.video import load_clip
from happyhorse_train.demo.clips import DEMO_CLIPS, write_demo_clips
from happyhorse_train.demo.random_model import build_random_pipeline, write_random_model
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.happyhorse.pipeline import with_first_frame
from happyhorse_train.models.presets import load_preset
from happyhorse_train.training import flow_matching as fm
from tests.conftest import run_script
from tests.integration.conftest import FAST, RULES
from tests.integration.test_train import losses

SIZE = dict(height=32, width=48, num_frames=9, max_sequence_length=16)


def i2v_preset() -> dict:
    preset = load_preset("tiny")
    preset["transformer"]["image_conditioning"] = "first_frame"
    return preset


@pytest.fixture(scope="module")
def i2v_model(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    from happyhorse_train.demo.autoencoder import TRAINED_VAE

    # The demo's trained VAE, so that a decoded first frame looks like the image it came from.
    vae = AutoencoderKLWan.from_pretrained(TRAINED_VAE)
    return write_random_model(tmp_path_factory.mktemp("i2v") / "model", i2v_preset(), seed=0, vae=vae)


def test_training_gives_the_cached_image_latent_as_first_frame_and_leaves_it_out_of_the_loss():
    spec, transformer = get_spec("happyhorse"), build_random_pipeline(i2v_preset(), 0).transformer
    generator = torch.Generator().manual_seed(0)
    clean, noise = (torch.randn(2, 16, 3, 4, 6, generator=generator) for _ in range(2))
    image = torch.randn(2, 16, 1, 4, 6, generator=generator)  # the cached first_latents
    noisy = fm.noisy_latents(clean, noise, torch.tensor([0.3, 0.8]))
    given_input, given, inputs = spec.conditioned_input(transformer, noisy, {"first_latents": image})
    assert inputs == {}
    assert torch.equal(given_input[:, :, :1], image) and torch.equal(given_input[:, :, 1:], noisy[:, :, 1:])
    exact = fm.velocity_target(clean, noise)
    assert fm.squared_errors(exact, exact, given).eq(0).all()  # the oracle's loss
    wrong_first = exact.clone()
    wrong_first[:, :, 0] += 1.0
    assert fm.squared_errors(wrong_first, exact, given).eq(0).all()  # frame 0 is given, not trained
    wrong_second = exact.clone()
    wrong_second[:, :, 1] += 1.0
    assert fm.squared_errors(wrong_second, exact, given).gt(0).all()

    text_only = build_random_pipeline("tiny", 0).transformer
    assert spec.conditioned_input(text_only, noise, {}) == (noise, None, {})


def test_the_pipeline_driven_by_the_exact_velocity_returns_the_clip_with_the_image_as_first_frame():
    pipe = build_random_pipeline(i2v_preset(), 0)
    frames = np.random.default_rng(0).integers(0, 256, (SIZE["num_frames"], 32, 48, 3), dtype=np.uint8)
    with torch.no_grad():
        video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        clip = get_spec("happyhorse").normalize_latents(pipe, pipe.vae.encode(video).latent_dist.mode())
        image_latent = pipe.encode_image(Image.fromarray(frames[0]), 32, 48, torch.device("cpu"))
    torch.testing.assert_close(image_latent[:, :, 0], clip[:, :, 0], atol=1e-4, rtol=1e-4)  # causal VAE: frame 0
    target = with_first_frame(clip, image_latent)

    def exact_velocity(hidden_states, timestep, **_):
        sigma = (timestep.float() / 1000).view(-1, 1, 1, 1, 1)
        return ((hidden_states.float() - target) / sigma,)

    pipe.transformer.forward = exact_velocity
    out = pipe("a clip", image=Image.fromarray(frames[0]), guidance_scale=1.0, num_inference_steps=4,
               output_type="latent", generator=torch.Generator().manual_seed(0), **SIZE).frames
    torch.testing.assert_close(out, target, atol=1e-4, rtol=1e-4)


def test_train_and_sample_an_image_to_video_model_end_to_end(i2v_model, demo_model_dir, dataset, tmp_path):
    image = tmp_path / "first.png"
    Image.fromarray(np.full((32, 64, 3), 200, dtype=np.uint8)).save(image)
    out = tmp_path / "run"
    validation = ["validation.every=2", f"validation.images=[{image}]", "validation.height=32", "validation.width=64",
                  "validation.num_frames=5", "validation.num_inference_steps=2"]
    trained = run_script("train.py", "+experiment=demo", f"model.path={i2v_model}", f"data.dataset={dataset}",
                         f"output_dir={out}", "trainer.max_steps=2", *FAST, *validation)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert len(losses(out)) == 2 and all(np.isfinite(losses(out)))
    assert list((out / "validation" / "step-00000002").glob("*.mp4"))  # rendered from the image

    text_validation = run_script("train.py", "+experiment=demo", f"model.path={demo_model_dir}",
                                 f"data.dataset={dataset}", f"output_dir={tmp_path / 't2v'}", *FAST, *validation)
    assert text_validation.returncode == 2 and "validation.images given, but this happyhorse model is text-to-video" \
        in text_validation.stderr and "encoding clips" not in text_validation.stderr

    common = ["height=32", "width=64", "num_frames=5", "num_inference_steps=2", f"output_dir={tmp_path / 's'}"]
    other = tmp_path / "other.png"
    Image.fromarray(np.full((32, 64, 3), 30, dtype=np.uint8)).save(other)
    sampled = run_script("sample.py", f"model.path={i2v_model}", f"image=[{image},{other}]", f"loras=[{out / 'lora'}]",
                         "prompts=[a horse,a dog]", *common)  # one first frame per prompt
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    videos = sorted((tmp_path / "s").glob("*.mp4"))
    assert len(videos) == 2
    import decord

    first = {video.stem.split("_")[2]: decord.VideoReader(str(video))[0].asnumpy().mean() for video in videos}
    # Each video opens on its own image: measured 169 for the horse (image 200), 26 for the dog (image 30).
    assert first["horse"] > first["dog"] + 50

    no_image = run_script("sample.py", f"model.path={i2v_model}", *common)
    assert no_image.returncode == 2 and "this model is image-to-video (first_frame): give image=PATH" in no_image.stderr
    text_model = run_script("sample.py", f"model.path={demo_model_dir}", f"image={image}", *common)
    assert text_model.returncode == 2 and "image given, but this happyhorse model is text-to-video" in text_model.stderr
    assert "Traceback" not in no_image.stderr + text_model.stderr


def test_a_first_frame_image_beside_a_clip_is_its_condition(i2v_model, tmp_path):
    clips = write_demo_clips(tmp_path / "clips", DEMO_CLIPS[:3])
    Image.fromarray(np.full((48, 72, 3), 230, dtype=np.uint8)).save(clips[0].with_name(f"{clips[0].stem}.first.png"))
    clips[1].with_name(f"{clips[1].stem}.first.jpg").write_bytes(b"not an image")
    result = prepare_clips(tmp_path / "clips", RULES, num_workers=1, progress=False)
    write_dataset_folder(result, tmp_path / "clips", tmp_path / "dataset", RULES)
    assert [d.reason for d in result.dropped] == [f"its first-frame image {clips[1].stem}.first.jpg does not decode: "
                                                 f"{result.probes[f'{clips[1].stem}.first.jpg'].reason}"]
    assert "1 file(s) have a first-frame image (<name>.first.png)" in "\n".join(result.notes)
    rows = load_manifest(tmp_path / "dataset").to_list()
    [with_image] = [row for row in rows if row["first_frame"]]
    windows = [{"start_frame": 0}, {"start_frame": 17}]  # a later window opens on its own frame 0
    attach_first_frame(Path(with_image["first_frame"]), result.probes[f"{clips[0].stem}.first.png"], windows)
    assert [bool(window["first_frame"]) for window in windows] == [True, False]
    inspected = run_script("data_tools/inspect_dataset.py", str(tmp_path / "dataset"), "--plot", str(tmp_path / "p"))
    assert inspected.returncode == 0 and "first-frame images: 1 source file(s)" in inspected.stdout, inspected.stderr

    spec = get_spec("happyhorse", 16)
    pipe = spec.load_pipeline(i2v_model, torch.device("cpu"), torch.float32)
    encoder = spec.clip_encoder(pipe, i2v_model)
    cache = LatentCache(tmp_path / "cache")
    fill_cache(rows, cache, encoder, progress=False)
    key = video_entry_key(with_image, encoder.video_id)
    assert key != video_entry_key({**with_image, "first_frame_fingerprint": ""}, encoder.video_id)  # the key covers it
    entry = cache.get(key)
    # The image at the bucket size, encoded alone:
    image = load_clip(Path(with_image["first_frame"]), [0], with_image["bucket_height"], with_image["bucket_width"])
    torch.testing.assert_close(entry["first_latents"], encoder.condition_latents(image)[0])
    own_first = spec.normalize_latents(pipe, entry["mean"][None])[0, :, :1]
    assert (entry["first_latents"] - own_first).abs().mean() > 0.1  # not the clip's own frame 0
    without = cache.get(video_entry_key(next(row for row in rows if not row["first_frame"]), encoder.video_id))
    assert without["first_latents"].shape == entry["first_latents"].shape  # every clip of an I2V model has one
