"""Wan image to video in both of diffusers' ways (Wan 2.1 I2V: the image on channels with CLIP embeddings; Wan 2.2
TI2V: the clean first frame at timestep 0): training gives the transformer what WanImageToVideoPipeline gives it,
one train.py run each, sample.py image= end to end, and diffusers' own loader takes the LoRA with nothing left."""

from __future__ import annotations

import re
from types import SimpleNamespace

import decord
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
from PIL import Image
from safetensors.torch import load_file

from happyhorse_train.demo.autoencoder import TRAINED_VAE
from happyhorse_train.demo.random_model import write_random_model
from happyhorse_train.errors import UserInputError
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.presets import load_preset
from happyhorse_train.rendering.sample_pipeline import apply_loras
from happyhorse_train.rendering.videos import render_conditioned
from happyhorse_train.training import flow_matching as fm
from tests.conftest import run_script
from tests.integration.conftest import FAST
from tests.integration.test_train import losses

PRESETS = ["wan2.1-i2v-tiny", "wan2.2-ti2v-tiny"]
PROMPT = "a red circle moving left to right on a black background"
# The image embedder's linears too, whose ComfyUI names (img_emb.proj.1 / .3) only an I2V model has.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "add_k_proj", "add_v_proj",
           "condition_embedder.image_embedder.ff.net.0.proj", "condition_embedder.image_embedder.ff.net.2"]
# Every linear layer name of the original Wan I2V model (Wan's model.py), as ComfyUI keys its LoRAs.
COMFYUI_WAN_I2V_LINEARS = re.compile(
    r"diffusion_model\.(blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.([qkvo]|k_img|v_img)|ffn\.[02])"
    r"|img_emb\.proj\.[13]|head\.head|text_embedding\.[02]|time_embedding\.[02]|time_projection\.1)"
    r"\.(lora_down\.weight|lora_up\.weight|alpha)$"
)


def text_tokens(preset: str) -> int:
    return load_preset(preset)["sample"]["max_sequence_length"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    # The demo's trained VAE (the tiny Wan VAE's shape), so that a decoded first frame looks like its image.
    vae = AutoencoderKLWan.from_pretrained(TRAINED_VAE)
    folder = tmp_path_factory.mktemp("wan_i2v")
    return {preset: write_random_model(folder / preset, preset, seed=0, vae=vae) for preset in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
def test_training_gives_the_transformer_exactly_what_the_pipeline_gives_it(preset, models):
    spec = get_spec("wan-i2v", text_tokens(preset))
    pipe = spec.load_pipeline(models[preset], torch.device("cpu"), torch.float32)
    frames = np.random.default_rng(0).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    encoder = spec.clip_encoder(pipe, models[preset])
    entry = encoder.encode_video(pixels)  # what the cache stores for this clip
    clip = spec.normalize_latents(pipe, entry["mean"][None])
    cached = {name: tensor[None] for name, tensor in entry.items() if name not in ("mean", "std")}
    calls = []

    def exact_velocity(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None, **_):
        calls.append(SimpleNamespace(latents=hidden_states.clone(), timestep=timestep.clone(),
                                     text=encoder_hidden_states.clone(), image=encoder_hidden_states_image))
        sigma = timestep.float().reshape(len(timestep), -1).amax(1).view(-1, 1, 1, 1, 1) / 1000
        return ((hidden_states[:, :16].float() - clip) / sigma,)

    pipe.transformer.forward = exact_velocity
    out = pipe(prompt=PROMPT, image=Image.fromarray(frames[0]), height=32, width=48, num_frames=9, guidance_scale=1.0,
               num_inference_steps=4, max_sequence_length=text_tokens(preset), output_type="latent",
               generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(out, clip, atol=1e-4, rtol=1e-4)  # the oracle: the clip, opening on its image

    # Training's input for the pipeline's second step, from the cache entry, fed through predict_velocity.
    seen = calls[1]
    noisy = seen.latents[:, :16].clone()
    if preset == "wan2.2-ti2v-tiny":  # training's noisy frame 0 is noise: the condition must replace it
        noisy[:, :, 0] = torch.randn_like(noisy[:, :, 0])
    given = spec.conditioned_input(pipe.transformer, noisy, cached)
    calls.clear()
    t = seen.timestep.reshape(-1).amax()
    text = encoder.encode_texts([PROMPT])[0]["text"][None]
    spec.predict_velocity(pipe.transformer, given.latents, t.reshape(1), text, None, **given.inputs)
    trained = calls[0]
    torch.testing.assert_close(trained.latents, seen.latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trained.timestep.float(), seen.timestep.float())
    torch.testing.assert_close(trained.text, seen.text)
    if preset == "wan2.1-i2v-tiny":
        assert seen.latents.shape[1] == 36 and torch.equal(trained.image, seen.image)
    else:
        assert seen.image is None and seen.timestep[0, 0] == 0 and seen.timestep[0, -1] == t  # frame 0's tokens at 0

    # The loss of the exact velocity is 0; a wrong frame 0 counts only where the model predicts it.
    noise = torch.randn_like(clip)
    exact = fm.velocity_target(clip, noise)
    assert fm.squared_errors(exact, exact, given.loss_mask).eq(0).all()
    wrong_first = exact.clone()
    wrong_first[:, :, 0] += 1.0
    error = fm.squared_errors(wrong_first, exact, given.loss_mask)
    assert error.eq(0).all() if preset == "wan2.2-ti2v-tiny" else error.gt(0).all()


@pytest.fixture(scope="module")
def runs(models, dataset, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("wan_i2v_runs")
    image = folder / "first.png"
    Image.fromarray(np.full((32, 64, 3), 200, dtype=np.uint8)).save(image)
    runs = {}
    for preset in PRESETS:
        out = folder / preset
        validation = ["validation.every=2", f"validation.images=[{image}]", "validation.height=32",
                      "validation.width=64", "validation.num_frames=5", "validation.num_inference_steps=2"]
        trained = run_script(
            "train.py", "+experiment=demo", f"model={preset}", f"model.path={models[preset]}",
            f"data.dataset={dataset}", f"output_dir={out}", "trainer.max_steps=2", "optimizer.lr=3e-2",
            f"lora.target_modules=[{','.join(TARGETS)}]", *FAST, f"data.max_sequence_length={text_tokens(preset)}",
            *validation,
        )
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert len(losses(out)) == 2 and all(np.isfinite(losses(out)))
        assert list((out / "validation" / "step-00000002").glob("*.mp4"))  # rendered from the image
        runs[preset] = out
    return runs


@pytest.mark.parametrize("preset", PRESETS)
def test_train_and_sample_each_wan_image_to_video_model(preset, models, runs, tmp_path):
    images = []
    for value in (200, 30):
        images.append(tmp_path / f"{value}.png")
        Image.fromarray(np.full((32, 64, 3), value, dtype=np.uint8)).save(images[-1])
    common = ["height=32", "width=64", "num_frames=5", "num_inference_steps=2", f"output_dir={tmp_path / 's'}"]
    sampled = run_script("sample.py", f"model={preset}", f"model.path={models[preset]}",
                         f"image=[{images[0]},{images[1]}]", f"loras=[{runs[preset] / 'lora'}]",
                         "prompts=[a horse,a dog]", *common)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    videos = sorted((tmp_path / "s").glob("*.mp4"))
    assert len(videos) == 2
    if preset == "wan2.2-ti2v-tiny":  # the image is the first latent frame itself
        first = {video.stem.split("_")[2]: decord.VideoReader(str(video))[0].asnumpy().mean() for video in videos}
        assert first["horse"] > first["dog"] + 50, first

    no_image = run_script("sample.py", f"model={preset}", f"model.path={models[preset]}", *common)
    assert no_image.returncode == 2 and "this model is image-to-video" in no_image.stderr, no_image.stderr[-2000:]
    assert "Traceback" not in no_image.stderr


def test_diffusers_loads_our_wan_i2v_lora_with_no_key_left_and_renders_what_sample_py_renders(models, runs):
    preset = "wan2.1-i2v-tiny"
    lora_folder, image = runs[preset] / "lora", Image.fromarray(np.full((32, 64, 3), 200, dtype=np.uint8))
    settings = SimpleNamespace(negative_prompt="", height=32, width=64, num_frames=5, num_inference_steps=3,
                               guidance_scale=4.0, max_sequence_length=512, seed=0)
    theirs = WanImageToVideoPipeline.from_pretrained(models[preset])
    theirs.load_lora_weights(str(lora_folder))
    params = dict(theirs.transformer.named_parameters())
    file = load_file(lora_folder / "pytorch_lora_weights.safetensors")
    assert any(".attn2.add_k_proj." in key for key in file) and any("image_embedder" in key for key in file)
    for key, tensor in file.items():  # every tensor of the file is in the model, as the file has it
        name = key.removeprefix("transformer.").replace(".lora_A.", ".lora_A.default_0.").replace(
            ".lora_B.", ".lora_B.default_0.")
        assert torch.equal(params[name], tensor), key
    from_diffusers = render_conditioned(theirs, [PROMPT], settings, [image])

    spec = get_spec("wan-i2v", 512)  # what sample.py does: our loader, our LoRA check, our render
    ours = spec.load_pipeline(models[preset], torch.device("cpu"), torch.float32)
    apply_loras(ours, spec, [str(lora_folder)], [1.0])
    np.testing.assert_allclose(render_conditioned(ours, [PROMPT], settings, [image]), from_diffusers, atol=1e-5)
    base = render_conditioned(WanImageToVideoPipeline.from_pretrained(models[preset]), [PROMPT], settings, [image])
    assert np.abs(from_diffusers - base).mean() > 1e-3  # the LoRA does something

    comfy = load_file(lora_folder / "comfyui_lora.safetensors")
    assert not [key for key in comfy if not COMFYUI_WAN_I2V_LINEARS.match(key)]
    assert {"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight",
            "diffusion_model.img_emb.proj.1.lora_up.weight"} <= comfy.keys()
    converted = WanImageToVideoPipeline.from_pretrained(models[preset])
    converted.load_lora_weights(str(lora_folder), weight_name="comfyui_lora.safetensors")  # diffusers' own converter
    np.testing.assert_allclose(render_conditioned(converted, [PROMPT], settings, [image]), from_diffusers, atol=1e-5)


def test_the_cache_key_covers_the_image_conditioning_and_the_image_encoder(models, tmp_path):
    preset = "wan2.1-i2v-tiny"
    pipe = get_spec("wan-i2v", 512).load_pipeline(models[preset], torch.device("cpu"), torch.float32)
    on_channels = get_spec("wan-i2v", 512).clip_encoder(pipe, models[preset]).video_id
    text_only = get_spec("wan", 512).clip_encoder(pipe, models[preset]).video_id  # the same VAE, no image parts
    other_folder = write_random_model(tmp_path / "other", preset, seed=1, vae=pipe.vae)  # another CLIP encoder
    other_pipe = get_spec("wan-i2v", 512).load_pipeline(other_folder, torch.device("cpu"), torch.float32)
    other = get_spec("wan-i2v", 512).clip_encoder(other_pipe, other_folder).video_id
    assert on_channels.startswith(f"{text_only}:first_frame_on_channels:")
    assert other.split(":")[-2] != on_channels.split(":")[-2]  # the image encoder's part

    ti2v = get_spec("wan-i2v", 64)
    ti2v_pipe = ti2v.load_pipeline(models["wan2.2-ti2v-tiny"], torch.device("cpu"), torch.float32)
    assert ti2v.clip_encoder(ti2v_pipe, models["wan2.2-ti2v-tiny"]).video_id == f"{text_only}:first_frame"


def test_a_wan_i2v_folder_whose_parts_disagree_is_one_line_before_it_loads(models, tmp_path):
    import json
    import shutil

    def broken(preset: str, change) -> str:
        folder = tmp_path / f"{preset}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(models[preset], folder)
        change(folder)
        return folder

    def edit_index(**fields):
        def change(folder):
            index = json.loads((folder / "model_index.json").read_text())
            (folder / "model_index.json").write_text(json.dumps({**index, **fields}))
        return change

    cases = [
        (get_spec("wan-i2v", 512), broken("wan2.1-i2v-tiny", edit_index(expand_timesteps=True)),
         "model_index.json has expand_timesteps=True, but the transformer takes the image first_frame_on_channels"),
        (get_spec("wan-i2v", 64), broken("wan2.2-ti2v-tiny", edit_index(expand_timesteps=False)),
         "set expand_timesteps to True (true for Wan 2.2 TI2V"),
        (get_spec("wan-i2v", 512), broken("wan2.1-i2v-tiny", lambda folder: shutil.rmtree(folder / "image_encoder")),
         "the transformer takes CLIP image embeddings (image_dim 16), but there is no image_encoder subfolder"),
        (get_spec("wan-i2v", 64), models["wan2.1-i2v-tiny"], "reads prompts as exactly 512 tokens"),
        (get_spec("wan-i2v", 64), broken("wan2.2-ti2v-tiny", edit_index(boundary_ratio=0.9)), "two-expert Wan 2.2"),
    ]
    for spec, folder, message in cases:
        with pytest.raises(UserInputError, match=re.escape(message)):
            spec.load_pipeline(folder, torch.device("cpu"), torch.float32)
