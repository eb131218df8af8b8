"""Token-chunked feed-forwards: the largest part of a long forward's working memory is the MLP's hidden
activations (three tokens x ffn_dim tensors: 6.8 GiB for the 8B at 720x480x121 with guidance)."""

from __future__ import annotations

import torch


def chunk_feed_forwards(model: torch.nn.Module, classes: tuple[str, ...], chunk_tokens: int) -> None:
    """Run every token-wise MLP of `model` (modules of the named classes) over `chunk_tokens` tokens at a time.

    An MLP acts on each token alone, so the result is the same; its hidden activations then exist for one
    chunk at a time. The module's own `forward` is wrapped on the instance: names and LoRA keys stay as they are.
    """
    modules = [m for m in model.modules() if type(m).__name__ in classes]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no feed-forward module of the classes {classes}")
    for module in modules:
        module.forward = _token_chunked(module.forward, chunk_tokens)


def _token_chunked(forward, chunk_tokens: int):
    def chunked_forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if hidden_states.shape[1] <= chunk_tokens:
            return forward(hidden_states, *args, **kwargs)
        parts = hidden_states.split(chunk_tokens, dim=1)
        return torch.cat([forward(part, *args, **kwargs) for part in parts], dim=1)

    return chunked_forward
