"""sample.py's pipeline, placed so that it fits the card it renders on.

The 8B transformer (15 GiB in bf16) and its UMT5-XXL text encoder (11 GiB) do not fit a 24 GB card
together. Three settings make them fit (docs/memory.md, "Sampling"):
- `base_weights`: the transformer's block weights stored quantized (memory/quantize.py);
- `blocks_to_swap`: N blocks' weights in pinned host RAM, streamed in ahead of use (offload.BlockSwap);
- `offload_models`: each model on the GPU only while it runs (diffusers' model CPU offload, which the
  pipeline's `model_cpu_offload_seq` drives).
And one for the forward's working memory:
- `ffn_chunk_tokens`: each MLP runs over that many tokens at a time (memory/ffn_chunks.py): the same result.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from happyhorse_train.combinations import combination_problems
from happyhorse_train.errors import UserInputError
from happyhorse_train.memory.ffn_chunks import chunk_feed_forwards
from happyhorse_train.memory.offload import BlockSwap, repeated_blocks
from happyhorse_train.memory.recompute import compile_blocks
from happyhorse_train.memory.streamed_load import base_transformer


def check_inference_memory(memory, compile: bool) -> None:
    problems = combination_problems(SimpleNamespace(memory=memory, compile=compile), sampling=True)
    if problems:
        raise UserInputError("bad memory settings:\n  " + "\n  ".join(problems))


def load_inference_pipeline(spec, path, device: torch.device, dtype: torch.dtype, memory, compile: bool, log=print):
    """`spec`'s pipeline from `path`, placed on `device` as `memory` asks, its blocks compiled if `compile`."""
    check_inference_memory(memory, compile)
    offload = memory.offload_models and device.type != "cpu"
    if memory.offload_models and not offload:
        log("memory.offload_models: nothing to do on the CPU (every model is in host RAM already)")
    target = torch.device("cpu") if offload else device
    pipe = spec.load_pipeline(
        path, target, dtype, base_transformer(spec, path, memory.base_weights, target, dtype, log),
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


def apply_loras(pipe, spec, paths: list[str], scales: list[float]) -> list[str]:
    """Load each LoRA as its own adapter of `spec`'s pipeline and activate them together with their weights;
    returns the adapter names. Every file is checked against the transformer before any loads."""
    if scales and len(scales) != len(paths):
        raise UserInputError(f"{len(scales)} lora_scales for {len(paths)} loras; give one scale per LoRA or none")
    for path in paths:
        spec.check_lora_file(path, pipe.transformer)
    names = [f"lora_{index}" for index in range(len(paths))]
    for name, path in zip(names, paths):
        pipe.load_lora_weights(path, adapter_name=name)
    if names:
        pipe.set_adapters(names, adapter_weights=list(scales) or [1.0] * len(names))
    return names
