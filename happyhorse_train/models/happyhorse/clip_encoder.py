"""HappyHorse's caption encoding for the cache (the VAE part is shared: models/clip_encoder.py)."""

from __future__ import annotations

import torch

from happyhorse_train.models.clip_encoder import VaeClipEncoder


class HappyHorseClipEncoder(VaeClipEncoder):
    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        states, mask = self.pipe.encode_prompt(captions, self.max_sequence_length, self.pipe.text_encoder.device)
        return [{"text": s[: int(m.sum())].float()} for s, m in zip(states, mask)]
