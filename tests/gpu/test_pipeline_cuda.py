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
