"""Rectified-flow math: interpolation endpoints, velocity, sigma sampling, shifts, loss weights and loss."""

import math

import pytest
import torch

from happyhorse_train.models.presets import load_preset
from happyhorse_train.planner.facts import meta_transformer
from happyhorse_train.planner.request import latent_shape
from happyhorse_train.training import flow_matching as fm

BIG = 20_000


def draw(scheme: str, seed: int = 0, n: int = BIG, **kwargs) -> torch.Tensor:
    return fm.sample_sigmas(n, scheme, torch.Generator().manual_seed(seed), **kwargs)


def latents_and_noise(batch: int = 3, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, 4, 2, 3, 5, generator=generator).to(dtype)
    noise = torch.randn(batch, 4, 2, 3, 5, generator=generator).to(dtype)
    return x0, noise


def test_noisy_latents_endpoints_are_data_and_noise():
    x0, noise = latents_and_noise(2)
    assert torch.equal(fm.noisy_latents(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(fm.noisy_latents(x0, noise, torch.ones(2)), noise)


def test_noisy_latents_per_sample_sigma_and_dtype():
    x0, noise = latents_and_noise(2, torch.bfloat16)
    noisy = fm.noisy_latents(x0, noise, torch.tensor([0.0, 1.0]))
    assert noisy.dtype == torch.bfloat16
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[1], noise[1])


def test_noisy_latents_rejects_wrong_sigma_count():
    x0, noise = latents_and_noise(3)
    with pytest.raises(ValueError, match="one sigma per sample"):
        fm.noisy_latents(x0, noise, torch.rand(1))


def test_perfect_velocity_gives_zero_loss_and_recovers_data():
    x0, noise = latents_and_noise(3)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    noisy = fm.noisy_latents(x0, noise, sigmas)
    target = fm.velocity_target(x0, noise)
    assert fm.weighted_mean(fm.squared_errors(target, target), fm.loss_weights(sigmas, "cosmap")).item() == 0.0
    # One Euler step of size -sigma along the true velocity lands on the data.
    torch.testing.assert_close(noisy - sigmas.view(-1, 1, 1, 1, 1) * target, x0, atol=1e-6, rtol=1e-5)


def test_uniform_samples_lie_in_unit_interval_with_mean_half():
    sigmas = draw("uniform")
    assert sigmas.shape == (BIG,) and sigmas.dtype == torch.float32
    assert 0 <= sigmas.min() and sigmas.max() <= 1
    assert abs(sigmas.mean().item() - 0.5) < 0.01


def test_logit_normal_median_and_shift_with_mean():
    centred = draw("logit_normal")
    assert abs(centred.median().item() - 0.5) < 0.02
    shifted = draw("logit_normal", logit_mean=1.0)
    assert abs(shifted.median().item() - 1 / (1 + math.exp(-1))) < 0.02  # sigmoid(1) ~ 0.73
    assert shifted.mean() > centred.mean() + 0.1


def test_mode_with_zero_scale_is_uniform_and_positive_scale_concentrates_mid_way():
    quantiles = torch.linspace(0, 1, 101)
    uniform = draw("uniform", seed=1).quantile(quantiles)
    flat_mode = draw("mode", seed=2, mode_scale=0.0).quantile(quantiles)
    assert (flat_mode - uniform).abs().max() < 0.02

    def share_mid_way(sigmas):
        return ((sigmas > 0.25) & (sigmas < 0.75)).float().mean().item()

    peaked = draw("mode", mode_scale=1.29)
    assert 0 <= peaked.min() and peaked.max() <= 1
    assert share_mid_way(peaked) > share_mid_way(draw("uniform")) + 0.1


def test_sampling_is_reproducible_and_leaves_global_rng_alone():
    for scheme in fm.SIGMA_SAMPLING:
        before = torch.get_rng_state()
        first = draw(scheme, seed=7, n=64)
        assert torch.equal(torch.get_rng_state(), before)
        assert torch.equal(first, draw(scheme, seed=7, n=64))
        assert not torch.equal(first, draw(scheme, seed=8, n=64))


def test_sampling_resumes_from_generator_state():
    generator = torch.Generator().manual_seed(3)
    fm.sample_sigmas(8, "logit_normal", generator)
    saved = generator.get_state()
    expected = fm.sample_sigmas(8, "logit_normal", generator)
    assert torch.equal(fm.sample_sigmas(8, "logit_normal", torch.Generator().set_state(saved)), expected)


def test_sampling_moves_to_requested_device():
    sigmas = fm.sample_sigmas(4, "uniform", torch.Generator().manual_seed(0), device="cpu")
    assert sigmas.device == torch.device("cpu") and sigmas.shape == (4,)


def test_unknown_sampling_scheme_names_the_allowed_ones():
    with pytest.raises(ValueError, match="uniform, logit_normal, mode"):
        draw("cosine", n=4)


def test_shift_sigmas():
    sigmas = torch.linspace(0, 1, 101)
    torch.testing.assert_close(fm.shift_sigmas(sigmas, 1.0), sigmas)
    shifted = fm.shift_sigmas(sigmas, 3.0)
    assert shifted[50].item() == pytest.approx(0.75)
    assert shifted[0].item() == 0.0 and shifted[-1].item() == pytest.approx(1.0)
    assert (shifted.diff() > 0).all()
    assert (shifted[1:-1] > sigmas[1:-1]).all()  # toward noise
    with pytest.raises(ValueError, match="> 0"):
        fm.shift_sigmas(sigmas, 0.0)


def test_resolution_shift_interpolates_and_grows_with_tokens():
    assert fm.resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert fm.resolution_shift(4096) == pytest.approx(math.exp(1.15))
    assert fm.resolution_shift(2176) == pytest.approx(math.exp((0.5 + 1.15) / 2))
    tokens = [256, 1024, 2048, 4096]
    shifts = [fm.resolution_shift(n) for n in tokens]
    assert shifts == sorted(shifts) and len(set(shifts)) == len(shifts)
    assert fm.resolution_shift(100, base_shift=0.2, max_shift=0.8, base_tokens=100, max_tokens=200) == pytest.approx(
        math.exp(0.2)
    )


def eight_b_tokens(width: int, height: int, frames: int) -> int:
    """Video tokens of one 8b-preset clip, counted as training counts them (the spec's num_tokens)."""
    preset = load_preset("8b")
    model, spec = meta_transformer(preset)
    return spec.num_tokens(model, latent_shape(preset, width, height, frames))


def test_resolution_shift_is_held_at_the_ends_of_its_line():
    tokens = eight_b_tokens(720, 480, 121)
    assert tokens == 41_850  # past max_tokens: the extrapolated line gave a shift of ~1880 here
    assert fm.resolution_shift(tokens) == pytest.approx(math.exp(1.15))
    assert fm.resolution_shift(eight_b_tokens(720, 480, 49)) == pytest.approx(math.exp(1.15))  # was ~31
    assert fm.resolution_shift(16) == pytest.approx(math.exp(0.5))
    shifted = fm.shift_sigmas(draw("logit_normal"), fm.resolution_shift(tokens))
    assert (shifted > 0.99).float().mean() < 0.01  # 0.03 % over 10^6 draws; unbounded it was 99.8 %
    # a falling line (max_shift below base_shift) is held at its ends too
    assert fm.resolution_shift(10**6, base_shift=1.0, max_shift=0.5) == pytest.approx(math.exp(0.5))
    assert fm.resolution_shift(0, base_shift=1.0, max_shift=0.5) == pytest.approx(math.exp(1.0))


def test_loss_weights():
    sigmas = torch.linspace(0, 1, 11)
    for scheme in fm.LOSS_WEIGHTING:
        weights = fm.loss_weights(sigmas, scheme)
        assert weights.shape == sigmas.shape and torch.isfinite(weights).all() and (weights > 0).all()
    assert torch.equal(fm.loss_weights(sigmas, "none"), torch.ones(11))
    cosmap = fm.loss_weights(sigmas, "cosmap")
    torch.testing.assert_close(cosmap, cosmap.flip(0))
    assert cosmap.argmax().item() == 5  # peaks at sigma 0.5
    sigma_sqrt = fm.loss_weights(torch.tensor([0.0, 0.5, 1.0]), "sigma_sqrt")
    assert sigma_sqrt.tolist() == [fm.MAX_SIGMA_SQRT_WEIGHT, 4.0, 1.0]
    with pytest.raises(ValueError, match="none, cosmap, sigma_sqrt"):
        fm.loss_weights(sigmas, "snr")


def test_loss_is_weighted_per_sample_mean_in_float32():
    target = torch.zeros(3, 2, 4)
    prediction = torch.zeros(3, 2, 4)
    prediction[0] = 1.0  # per-sample MSE 1
    prediction[1] = 2.0  # per-sample MSE 4
    prediction[2, 0, 0] = 8.0  # per-sample MSE 64 / 8 = 8
    errors = fm.squared_errors(prediction, target)
    assert errors.tolist() == [1.0, 4.0, 8.0]
    assert fm.weighted_mean(errors, torch.ones(3)).item() == pytest.approx((1 + 4 + 8) / 3)
    # A zero weight removes that sample's contribution entirely.
    assert fm.weighted_mean(errors, torch.tensor([1.0, 0.0, 1.0])).item() == pytest.approx(3.0)
    half = fm.weighted_mean(fm.squared_errors(prediction.bfloat16(), target.bfloat16()), torch.ones(3).bfloat16())
    assert half.dtype == torch.float32 and half.dim() == 0


def test_timesteps_are_sigma_times_1000():
    timesteps = fm.timesteps_from_sigmas(torch.tensor([0.0, 0.25, 1.0]))
    torch.testing.assert_close(timesteps, torch.tensor([0.0, 250.0, 1000.0]))
