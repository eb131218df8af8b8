"""EMA of the trainable weights: the update formula with and without warm-up, copy-out, save and resume."""

import io

import pytest
import torch

from happyhorse_train.training.ema import EMA


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in [(4, 3), (5,)]]


def step(params: list[torch.nn.Parameter], seed: int) -> None:
    """Stand-in for an optimizer step: move every weight by a reproducible amount."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype))


def test_shadow_is_a_detached_float32_copy():
    params = make_params(dtype=torch.bfloat16)
    ema = EMA(params)
    assert all(s.dtype == torch.float32 and not s.requires_grad for s in ema.shadow)
    step(params, seed=1)
    assert torch.equal(ema.shadow[0], make_params(dtype=torch.bfloat16)[0].float())


def test_update_without_warmup_follows_the_formula():
    params = make_params()
    ema = EMA(params, decay=0.9, warmup=False)
    before = [s.clone() for s in ema.shadow]
    step(params, seed=1)
    ema.update(params)
    for shadow, old, param in zip(ema.shadow, before, params):
        torch.testing.assert_close(shadow, 0.9 * old + 0.1 * param.detach())
    assert ema.num_updates == 1


def test_warmup_decay_grows_until_it_reaches_the_configured_decay():
    params = make_params()
    ema = EMA(params, decay=0.5)
    before = [s.clone() for s in ema.shadow]
    assert ema.effective_decay() == pytest.approx(1 / 10)
    step(params, seed=1)
    ema.update(params)
    for shadow, old, param in zip(ema.shadow, before, params):
        torch.testing.assert_close(shadow, 0.1 * old + 0.9 * param.detach())
    decays = []
    for n in range(1, 12):
        decays.append(ema.effective_decay())
        ema.update(params)
    expected = [min(0.5, (1 + n) / (10 + n)) for n in range(1, 12)]
    assert decays == pytest.approx(expected)
    assert decays[-1] == 0.5


def test_copy_to_casts_to_each_parameter_dtype():
    params = make_params()
    ema = EMA(params, decay=0.9, warmup=False)
    step(params, seed=1)
    ema.update(params)
    target = make_params(seed=5, dtype=torch.bfloat16)
    ema.copy_to(target)
    for param, shadow in zip(target, ema.shadow):
        assert param.dtype == torch.bfloat16
        assert torch.equal(param.detach(), shadow.bfloat16())


def test_update_with_bf16_params_accumulates_in_float32():
    params = make_params(dtype=torch.bfloat16)
    ema = EMA(params, decay=0.99, warmup=False)
    step(params, seed=1)
    ema.update(params)
    assert all(s.dtype == torch.float32 for s in ema.shadow)


def test_state_dict_round_trip_gives_identical_updates():
    params = make_params()
    ema = EMA(params, decay=0.95)
    for seed in range(3):
        step(params, seed)
        ema.update(params)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    resumed = EMA(make_params(seed=9), decay=0.5)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.decay == 0.95 and resumed.num_updates == 3
    for seed in range(3, 6):
        step(params, seed)
        ema.update(params)
        resumed.update(params)
    for original, restored in zip(ema.shadow, resumed.shadow):
        assert torch.equal(original, restored)


def test_loaded_state_is_not_shared_with_the_saved_one():
    params = make_params()
    state = EMA(params).state_dict()
    ema = EMA(params)
    ema.load_state_dict(state)
    ema.update([p.detach() + 1 for p in params])
    assert not torch.equal(ema.shadow[0], state["shadow"][0])


def test_mismatched_state_raises():
    ema = EMA(make_params())
    other_shapes = EMA([torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]).state_dict()
    with pytest.raises(ValueError, match="do not match"):
        ema.load_state_dict(other_shapes)
    with pytest.raises(ValueError, match="do not match"):
        ema.load_state_dict(EMA(make_params()[:1]).state_dict())


def test_parameter_count_mismatch_on_update_raises():
    ema = EMA(make_params())
    with pytest.raises(ValueError):
        ema.update(make_params()[:1])


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1, 1.5])
def test_decay_must_be_strictly_between_0_and_1(decay):
    with pytest.raises(ValueError, match="must be in"):
        EMA(make_params(), decay=decay)
