"""sample.py's memory settings: a pipeline placed so that it fits the card it renders on.

The 8B transformer (15 GiB in bf16) and its UMT5-XXL text encoder (11 GiB) do not fit a 24 GB card
together. Three settings make them fit (docs/memory.md, "Sampling"):
- `base_weights`: the transformer's block weights stored quantized (memory/quantize.py);
- `blocks_to_swap`: N blocks' weights in pinned host RAM, streamed in ahead of use (offload.BlockSwap);
- `offload_models`: each model on the GPU only while it runs (diffusers' model CPU offload, which the
  pipeline's `model_cpu_offload_seq` drives).
And one for the forward's working memory, whose largest part is the MLP's hidden activations (three
tokens x ffn_dim tensors: 6.8 GiB for the 8B at 720x480x121 with guidance):
- `ffn_chunk_tokens`: each MLP runs over that many tokens at a time (`chunk_feed_forwards`): the same result.
"""

from __future__ import annotations

import torch

from happyhorse_train.errors import UserInputError
from happyhorse_train.memory.checkpointing import compile_blocks
from happyhorse_train.memory.offload import BlockSwap, repeated_blocks
from happyhorse_train.memory.quantize import BASE_WEIGHT_FORMATS


def check_inference_memory(memory, compile: bool) -> None:
    problems = []
    if memory.base_weights not in BASE_WEIGHT_FORMATS:
        problems.append(f"memory.base_weights={memory.base_weights!r}: use one of {', '.join(BASE_WEIGHT_FORMATS)}")
    if memory.blocks_to_swap < 0:
        problems.append(f"memory.blocks_to_swap={memory.blocks_to_swap}: must be 0 or more")
    if memory.offload_models and memory.blocks_to_swap:
        problems.append("memory.offload_models moves the whole transformer on and off the GPU; it and "
                        "memory.blocks_to_swap exclude each other (set one)")
    if memory.offload_models and memory.base_weights != "bf16":
        problems.append(f"memory.offload_models with memory.base_weights={memory.base_weights}: quantized weights "
                        "stay on the GPU; set one of the two")
    if memory.ffn_chunk_tokens < 0:
        problems.append(f"memory.ffn_chunk_tokens={memory.ffn_chunk_tokens}: must be 0 (off) or more")
    if compile and memory.blocks_to_swap:
        problems.append("compile: block swap moves weights from hooks inside the blocks; set one of the two")
    if problems:
        raise UserInputError("bad memory settings:\n  " + "\n  ".join(problems))


def load_inference_pipeline(spec, path, device: torch.device, dtype: torch.dtype, memory, compile: bool, log=print):
    """`spec`'s pipeline from `path`, placed on `device` as `memory` asks, its blocks compiled if `compile`."""
    check_inference_memory(memory, compile)
    offload = memory.offload_models and device.type != "cpu"
    if memory.offload_models and not offload:
        log("memory.offload_models: nothing to do on the CPU (every model is in host RAM already)")
    pipe = spec.load_pipeline(
        path, torch.device("cpu") if offload else device, dtype, memory.base_weights, log,
        transformer_to_device=not memory.blocks_to_swap or memory.base_weights != "bf16",  # quantized: streamed in
    )
    if memory.blocks_to_swap:
        transformer = pipe.transformer
        swap = BlockSwap(repeated_blocks(transformer), memory.blocks_to_swap, device)
        swap.move_resident_to_device(transformer)
        log(f"block swap: blocks {swap.swapped} live in host RAM, streamed in ahead of use")
    if memory.ffn_chunk_tokens:
        chunk_feed_forwards(pipe.transformer, spec.feed_forward_classes, memory.ffn_chunk_tokens)
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    if compile:
        compile_blocks(pipe.transformer)
    return pipe


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
