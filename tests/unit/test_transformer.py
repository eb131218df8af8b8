import torch

from happyhorse_train.models.happyhorse.transformer import HappyHorseTransformer3DModel, RotaryEmbedding3D
from happyhorse_train.models.presets import load_preset


def tiny_transformer(seed: int = 0) -> HappyHorseTransformer3DModel:
    torch.manual_seed(seed)
    return HappyHorseTransformer3DModel(**load_preset("tiny")["transformer"]).eval()


def tiny_inputs(batch: int = 2, text_tokens: int = 7, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, 3, 8, 12, generator=generator)
    text = torch.randn(batch, text_tokens, 32, generator=generator)
    timestep = torch.linspace(10.0, 900.0, batch)
    return latents, text, timestep


def test_forward_keeps_latent_shape_and_depends_on_text_and_time():
    model = tiny_transformer()
    latents, text, timestep = tiny_inputs()
    with torch.no_grad():
        out = model(latents, text, timestep).sample
        other_text = model(latents, text.flip(1), timestep).sample
        other_time = model(latents, text, timestep.flip(0)).sample
    assert out.shape == latents.shape
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, other_text, atol=1e-4)
    assert not torch.allclose(out, other_time, atol=1e-4)


def test_text_padding_is_masked_out():
    """A prompt padded to a longer batch gives the same output as the same prompt alone."""
    model = tiny_transformer()
    latents, text, timestep = tiny_inputs(batch=1, text_tokens=4)
    padded = torch.cat([text, torch.randn(1, 5, 32)], dim=1)  # padding filled with junk on purpose
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        alone = model(latents, text, timestep).sample
        with_padding = model(latents, padded, timestep, encoder_attention_mask=mask).sample
        unmasked = model(latents, padded, timestep).sample
    torch.testing.assert_close(with_padding, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-4)


def test_sandwich_layers_have_separate_text_and_video_weights():
    model = tiny_transformer()  # 3 layers, sandwich 1: first and last modality-specific, middle shared
    kinds = [(hasattr(b, "text"), hasattr(b, "video"), hasattr(b, "shared")) for b in model.blocks]
    assert kinds == [(True, True, False), (False, False, True), (True, True, False)]
    first = model.blocks[0]
    assert first.text.attn.to_q.weight.data_ptr() != first.video.attn.to_q.weight.data_ptr()


def test_grouped_query_attention_and_gate_shapes():
    attn = tiny_transformer().blocks[1].shared.attn
    assert attn.to_q.out_features == 4 * 16
    assert attn.to_k.out_features == attn.to_v.out_features == 2 * 16
    assert attn.to_gate.out_features == 4  # one sigmoid gate per head


def test_text_rope_positions_never_collide_with_video_positions():
    rope = RotaryEmbedding3D((4, 6, 6), 10000.0)
    cos, sin = rope(num_text_tokens=40, grid=(4, 5, 6), device=torch.device("cpu"))
    angles = torch.cat([cos, sin], dim=-1)
    text, video = angles[:40], angles[40:]
    distances = torch.cdist(text, video)
    assert distances.min() > 1e-3
    # Prefixes agree: a text token's position does not depend on how many tokens follow it.
    cos_short, _ = rope(num_text_tokens=10, grid=(4, 5, 6), device=torch.device("cpu"))
    torch.testing.assert_close(cos_short[:10], cos[:10])


def test_gradient_checkpointing_gives_the_same_gradients():
    latents, text, timestep = tiny_inputs()
    grads = []
    for checkpointing in (False, True):
        model = tiny_transformer().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(latents, text, timestep).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_transformer(seed=3)
    model.save_pretrained(tmp_path / "transformer")
    loaded = HappyHorseTransformer3DModel.from_pretrained(tmp_path / "transformer").eval()
    latents, text, timestep = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(model(latents, text, timestep).sample, loaded(latents, text, timestep).sample)
    without_path = lambda config: {k: v for k, v in config.items() if k != "_name_or_path"}  # noqa: E731
    assert without_path(loaded.config) == without_path(model.config)
