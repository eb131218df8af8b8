"""The tiny pipeline in bfloat16 on a GPU agrees with float32 on the CPU. Skips on machines without CUDA."""

import numpy as np
import pytest
import torch

from happyhorse_train.models.happyhorse import load_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_cuda_sample_matches_fp32_cpu(demo_model_dir):
    kwargs = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=32)
    prompt = "a blue square moving top to bottom"
    videos = []
    for device, dtype in ((torch.device("cpu"), torch.float32), (torch.device("cuda"), torch.bfloat16)):
        pipe = load_pipeline(demo_model_dir, device, dtype)
        videos.append(pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).frames)
    assert np.isfinite(videos[1]).all()
    assert np.abs(videos[0] - videos[1]).mean() < 0.05


@pytest.mark.parametrize("settings", [{"offload_models": True}, {"blocks_to_swap": 2}])
def test_sample_memory_settings_on_cuda_render_what_the_resident_pipeline_renders(demo_model_dir, settings):
    from omegaconf import OmegaConf

    from happyhorse_train.config import SampleMemoryConfig
    from happyhorse_train.models.backbones import get_spec
    from happyhorse_train.rendering.sample_pipeline import load_inference_pipeline

    kwargs = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=32)
    prompt = "a blue square moving top to bottom"
    device = torch.device("cuda")
    resident = load_pipeline(demo_model_dir, device, torch.float32)
    expected = resident(prompt, generator=torch.Generator().manual_seed(0), **kwargs).frames
    del resident

    memory = OmegaConf.structured(SampleMemoryConfig(**settings))
    pipe = load_inference_pipeline(get_spec("happyhorse"), demo_model_dir, device, torch.float32, memory, compile=False)
    frames = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).frames
    np.testing.assert_allclose(frames, expected, atol=1e-4)
    if settings.get("offload_models"):  # after the call every model is back in host RAM
        assert {p.device.type for p in pipe.transformer.parameters()} == {"cpu"}
        assert {p.device.type for p in pipe.text_encoder.parameters()} == {"cpu"}
    else:
        assert {p.device.type for p in pipe.transformer.blocks[0].parameters()} == {"cpu"}  # a swapped block


def test_validation_keeps_the_encoders_off_the_gpu_except_while_they_run(demo_model_dir):
    from happyhorse_train.memory.offload import encoders_on_device_while_running

    kwargs = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=32)
    prompt = "a blue square moving top to bottom"
    pipe = load_pipeline(demo_model_dir, torch.device("cuda"), torch.float32)
    expected = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).frames
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(pipe.text_encoder.device.type))
    with encoders_on_device_while_running(pipe, torch.device("cuda")):
        frames = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).frames
    np.testing.assert_allclose(frames, expected, atol=1e-5)
    assert seen == ["cpu"] * 3  # the text encoder had left the GPU before each denoising step
    assert pipe.vae.device.type == "cpu" and pipe.transformer.device.type == "cuda"
