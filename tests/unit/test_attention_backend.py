"""The attention hook: a registered kernel replaces SDPA for every model, without touching model code."""

import pytest
import torch

from happyhorse_train.models import attention
from tests.unit.test_transformer import tiny_inputs, tiny_transformer


def test_a_registered_backend_receives_every_attention_call():
    calls = []

    def recording_backend(query, key, value, attn_mask):
        calls.append((tuple(query.shape), tuple(key.shape)))
        return attention.sdpa_attention(query, key, value, attn_mask)

    model = tiny_transformer()
    latents, text, timestep = tiny_inputs()
    with torch.no_grad():
        reference = model(latents, text, timestep).sample
        attention.register_attention_backend("recording", recording_backend)
        attention.set_attention_backend("recording")
        try:
            through_backend = model(latents, text, timestep).sample
        finally:
            attention.set_attention_backend("sdpa")
    assert len(calls) == 3  # one per block of the tiny model
    assert calls[0] == ((2, 4, 7 + 3 * 4 * 6, 16), (2, 2, 7 + 3 * 4 * 6, 16))  # 4 query heads, 2 key/value heads
    torch.testing.assert_close(through_backend, reference)


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="available: .*sdpa"):
        attention.set_attention_backend("flash-attn-9")
