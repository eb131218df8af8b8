from types import SimpleNamespace

import torch

from happyhorse_train.models.latent_space import denormalize_latents, normalize_latents


def test_normalize_uses_per_channel_statistics_and_round_trips():
    vae = SimpleNamespace(config=SimpleNamespace(latents_mean=[1.0, -2.0], latents_std=[2.0, 0.5]))
    latents = torch.tensor([3.0, -1.0]).view(1, 2, 1, 1, 1).expand(1, 2, 2, 2, 2).contiguous()
    normalized = normalize_latents(vae, latents)
    assert torch.equal(normalized[0, :, 0, 0, 0], torch.tensor([1.0, 2.0]))  # (3 - 1) / 2, (-1 + 2) / 0.5
    torch.testing.assert_close(denormalize_latents(vae, normalized), latents)
    assert normalize_latents(vae, latents.bfloat16()).dtype == torch.bfloat16
