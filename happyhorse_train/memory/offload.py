"""Block swap and CPU-offloaded activation checkpointing, applied to a model from outside its code.

Both work on the model's repeated blocks, found through diffusers' `_repeated_blocks` marker, and both need
gradient checkpointing: a checkpointed block keeps no tensors of its own between the forward and the
backward, so its weights can leave the GPU in between and its input can wait in host RAM.

- `offloaded_checkpoint` replaces the checkpoint function the model calls for each block (diffusers'
  `enable_gradient_checkpointing(gradient_checkpointing_func=...)`): the block's input (the hidden states,
  one (batch, tokens, dim) tensor per block) is copied to pinned host RAM in the forward and back in the
  backward, where the block is recomputed. The other arguments (time modulation, RoPE tables, masks) are
  shared by every block, so they stay where they are.
- `BlockSwap` keeps the frozen weights of N blocks in pinned host RAM and copies each to the GPU just before
  it runs (the next one on a side stream while the current one computes), in the forward and again in the
  backward's recompute, which visits the blocks in reverse.
- `encoders_on_device_while_running` keeps a pipeline's other models (text encoder, VAE) in host RAM and
  puts each on the GPU only while it runs: validation renders beside a training transformer.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from torch import nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks in execution order (modules whose class diffusers marks as repeated)."""
    names = set(getattr(model, "_repeated_blocks", []) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks its _repeated_blocks names ({sorted(names)})")
    return blocks


# --- activation offload --------------------------------------------------------------------------


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run a block without keeping its activations; keep its input in host RAM; recompute in the backward."""

    @staticmethod
    def forward(ctx, block, requires_grad_marker, hidden_states, *rest):
        ctx.block, ctx.rest = block, rest
        ctx.device = hidden_states.device
        ctx.autocast = _autocast_state(hidden_states.device)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden_states.device) if hidden_states.is_cuda else None
        ctx.input_requires_grad = hidden_states.requires_grad
        ctx.host_input = _to_host(hidden_states)
        with torch.no_grad():
            return block(hidden_states, *rest)

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states = ctx.host_input.to(ctx.device, non_blocking=True).requires_grad_(ctx.input_requires_grad)
        rest = tuple(_detached_leaf(arg) for arg in ctx.rest)
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch.autocast(**ctx.autocast):
            torch.set_rng_state(ctx.cpu_rng)  # the same dropout masks as the forward
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            output = ctx.block(hidden_states, *rest)
        # Parameters get their gradients accumulated here; the inputs' gradients are returned.
        torch.autograd.backward(output, grad_output)
        grads = [hidden_states.grad if ctx.input_requires_grad else None]
        grads += [arg.grad if isinstance(arg, torch.Tensor) and arg.requires_grad else None for arg in rest]
        return (None, None, *grads)


# A function's output needs a grad-requiring input to join the graph; with LoRA the trained weights sit inside
# the block, and its tensor inputs (from the frozen base) may all be constants.
_REQUIRES_GRAD_MARKER = torch.empty(0, requires_grad=True)


def offloaded_checkpoint(block: nn.Module, hidden_states: torch.Tensor, *rest):
    """A drop-in for diffusers' gradient-checkpointing function that keeps block inputs in host RAM."""
    return _OffloadedCheckpoint.apply(block, _REQUIRES_GRAD_MARKER, hidden_states, *rest)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor.detach()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    # On the compute stream: the copy is ordered before anything that could reuse the GPU tensor's memory.
    return host.copy_(tensor.detach(), non_blocking=True)


def _detached_leaf(arg):
    if isinstance(arg, torch.Tensor) and arg.requires_grad:
        return arg.detach().requires_grad_(True)
    return arg


def _autocast_state(device: torch.device) -> dict:
    return {
        "device_type": device.type,
        "enabled": torch.is_autocast_enabled(device.type),
        "dtype": torch.get_autocast_dtype(device.type),
    }


# --- block swap ----------------------------------------------------------------------------------


class BlockSwap:
    """Keep the frozen weights of `num_swapped` of `blocks` in pinned host RAM; stream each one in ahead of use.

    The swapped blocks are spread evenly through the stack, so each copy overlaps the compute of the resident
    blocks before it. At most two swapped blocks are on the GPU at once: the one running and the one
    being fetched. Only frozen plain tensors move (a LoRA's trained weights stay on the GPU, where the
    optimizer holds them); so block swap is for LoRA training and inference, not full fine-tuning.
    """

    def __init__(self, blocks: list[nn.Module], num_swapped: int, device: torch.device):
        if not 0 < num_swapped <= len(blocks):
            raise ValueError(f"blocks_to_swap={num_swapped}: must be between 1 and the {len(blocks)} blocks")
        self.blocks, self.device = blocks, device
        step = len(blocks) / num_swapped
        self.swapped = sorted({int(i * step + step / 2) for i in range(num_swapped)})
        self._host = {index: self._move_frozen_to_host(blocks[index]) for index in self.swapped}
        self._ready: dict[int, torch.cuda.Event | None] = {}  # swapped blocks on the GPU (or being copied)
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._last_index: int | None = None
        self.resident_counts: list[int] = []  # swapped blocks on the GPU at each block call (for tests, logs)
        self._handles = [block.register_forward_pre_hook(self._before_block(i)) for i, block in enumerate(blocks)]

    def move_resident_to_device(self, model: nn.Module) -> None:
        """Every tensor of `model` in host RAM but the swapped blocks' frozen weights to the device. For a
        model loaded in host RAM: the whole of it is never on the GPU at once."""
        swapped = {(id(module), name) for moved in self._host.values() for module, name, _ in moved}
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None and param.device.type == "cpu" and (id(module), name) not in swapped:
                    param.data = param.data.to(self.device)
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type == "cpu" and (id(module), name) not in swapped:
                    module._buffers[name] = buffer.to(self.device)

    def _move_frozen_to_host(self, block: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
        moved = []
        for module in block.modules():
            tensors = [(n, p) for n, p in module._parameters.items() if p is not None and not p.requires_grad]
            tensors += [(n, b) for n, b in module._buffers.items() if b is not None]
            for name, tensor in tensors:
                if type(tensor) not in (torch.Tensor, nn.Parameter):
                    continue  # quantized tensor subclasses (bitsandbytes) carry state beside .data: left in place
                host = tensor.detach().to("cpu")
                if self.device.type == "cuda":
                    host = host.pin_memory()
                tensor.data = host
                moved.append((module, name, host))
        return moved

    def _before_block(self, index: int):
        last_block = len(self.blocks) - 1

        def hook(module, args):
            # Forward passes visit 0..L-1; a checkpointed backward recomputes L-1..0 (starting with the block
            # the forward ended on). Block 0 always starts a forward: nothing comes after it in reverse.
            last, self._last_index = self._last_index, index
            reverse = last is not None and index != 0 and (index < last or index == last == last_block)
            direction = -1 if reverse else 1
            if index in self._host:
                self._fetch(index)
                if self._copy_stream is not None:
                    torch.cuda.current_stream(self.device).wait_event(self._ready[index])
            # Whatever swapped block is not this one or the next gets released, then the next one is fetched.
            upcoming = self._next_swapped(index, direction)
            for other in list(self._ready):
                if other not in (index, upcoming):
                    self._release(other)
            if upcoming is not None:
                self._fetch(upcoming)
            self.resident_counts.append(len(self._ready))

        return hook

    def _next_swapped(self, index: int, direction: int) -> int | None:
        later = [i for i in self.swapped if (i - index) * direction > 0]
        return (min if direction > 0 else max)(later) if later else None

    def _fetch(self, index: int) -> None:
        if index in self._ready:
            return
        event = None
        if self._copy_stream is not None:
            compute_stream = torch.cuda.current_stream(self.device)
            self._copy_stream.wait_stream(compute_stream)  # e.g. a released copy's memory being reused
            with torch.cuda.stream(self._copy_stream):
                for module, name, host in self._host[index]:
                    on_device = host.to(self.device, non_blocking=True)
                    on_device.record_stream(compute_stream)  # freed only once the compute using it is done
                    getattr(module, name).data = on_device
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        self._ready[index] = event

    def _release(self, index: int) -> None:
        for module, name, host in self._host[index]:
            getattr(module, name).data = host
        del self._ready[index]

    def remove(self) -> None:
        """Undo: every block back on the device, hooks removed."""
        for handle in self._handles:
            handle.remove()
        for index in self.swapped:
            for module, name, host in self._host[index]:
                getattr(module, name).data = host.to(self.device)
        self._ready.clear()


# --- encoders on the GPU only while they run ---------------------------------------------------------


def pipeline_encoders(pipe) -> list[nn.Module]:
    """Every model of a pipeline but the transformer (text encoder, VAE)."""
    return [m for name, m in pipe.components.items() if name != "transformer" and isinstance(m, nn.Module)]


class _OnDeviceWhileRunning(ModelHook):
    """Accelerate hook: the module moves to `execution_device` before its forward and back to host RAM after.
    diffusers' VAE calls `pre_forward` alone around encode/decode; it goes back when the context ends."""

    def __init__(self, device: torch.device):
        self.execution_device = device  # diffusers' pipelines read this to place their inputs

    def pre_forward(self, module, *args, **kwargs):
        module.to(self.execution_device)
        return args, kwargs

    def post_forward(self, module, output):
        module.to("cpu")
        return output


@contextlib.contextmanager
def encoders_on_device_while_running(pipe, device: torch.device):
    """Every model of `pipe` but the transformer waits in host RAM, and is on `device` only while it runs.

    During validation on a 24 GB card the 8B text encoder (10.6 GiB) is then not on the GPU while the
    transformer denoises. Costs one copy in and out per render."""
    encoders = pipeline_encoders(pipe)
    for module in encoders:
        module.to("cpu")
        add_hook_to_module(module, _OnDeviceWhileRunning(device))
    try:
        yield
    finally:
        for module in encoders:
            remove_hook_from_module(module)
            module.to("cpu")
