"""Activation measurement on the meta device: what autograd saves in a real-shaped training forward, with
attention saving what a flash kernel saves (`FlashLikeAttention`) and bf16 autocast emulated (`EmulatedAutocast`)."""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from happyhorse_train.memory.offload import repeated_blocks
from happyhorse_train.models import attention as attention_hook
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.fused_linear import emulated_autocast
from happyhorse_train.models.presets import load_preset
from happyhorse_train.planner.assumptions import COMPUTE_DTYPE
from happyhorse_train.planner.facts import meta_encoders, meta_training_transformer, meta_transformer
from happyhorse_train.planner.request import latent_shape


# --- attention that saves what a flash kernel saves --------------------------------------------------------
class FlashLikeAttention(torch.autograd.Function):
    """Scaled dot-product attention that keeps for backward exactly what flash / cuDNN kernels keep: q, k, v,
    the output and a float32 log-sum-exp per query row; no tokens x tokens matrix.

    On real tensors it computes exact attention, forward and backward (at least float32 math, O(tokens^2)
    memory while it runs: for small test shapes); on the meta device only shapes. q (B, H, Lq, D);
    k, v (B, Hkv, Lk, D) with H a multiple of Hkv (grouped-query); key_mask bool (B, 1, 1, Lk) or None.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_mask=None, scale=None):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if q.device.type == "meta":
            out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        else:
            scores = _attention_scores(q, _expand_heads(k, q), key_mask, scale)
            lse = scores.logsumexp(-1)
            probs = torch.exp(scores - lse.unsqueeze(-1))  # float32 for 16-bit inputs, as flash keeps it
            out = (probs @ _expand_heads(v, q).to(probs.dtype)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        _ATTENTION_OUTPUT_BYTES[0] += out.numel() * out.element_size() + lse.numel() * lse.element_size()
        ctx.key_mask, ctx.scale = key_mask, scale  # the mask is an input (flash: tiny sequence offsets)
        _ATTENTION_FLOPS[0] += 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        math_dtype = _math_dtype(q)
        q_math = q.to(math_dtype)
        k_full, v_full = _expand_heads(k, q).to(math_dtype), _expand_heads(v, q).to(math_dtype)
        scores = _attention_scores(q_math, k_full, ctx.key_mask, ctx.scale)
        probs = torch.exp(scores - lse.to(math_dtype).unsqueeze(-1))  # from the saved log-sum-exp, as flash does
        grad_out = grad_out.to(math_dtype)
        grad_v = probs.transpose(-1, -2) @ grad_out
        grad_probs = grad_out @ v_full.transpose(-1, -2)
        row_dot = (grad_out * out.to(math_dtype)).sum(-1, keepdim=True)
        grad_scores = probs * (grad_probs - row_dot) * ctx.scale
        grad_q = grad_scores @ k_full
        grad_k = grad_scores.transpose(-1, -2) @ q_math
        grad_k, grad_v = _sum_heads(grad_k, k).to(k.dtype), _sum_heads(grad_v, v).to(v.dtype)
        return grad_q.to(q.dtype), grad_k, grad_v, None, None


_ATTENTION_FLOPS = [0]  # forward attention FLOPs since the last reset (4 B H Lq Lk D per call)
_ATTENTION_OUTPUT_BYTES = [0]  # bytes of the outputs and log-sum-exps attention kept since the last reset


def _expand_heads(kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)  # grouped-query heads, as SDPA's enable_gqa


def _sum_heads(grad: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    b, _, length, dim = grad.shape
    return grad.reshape(b, kv.shape[1], -1, length, dim).sum(2)


def _math_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)  # at least float32, as the kernels accumulate


def _attention_scores(q, k_full, key_mask, scale):
    math_dtype = _math_dtype(q)
    scores = (q.to(math_dtype) @ k_full.to(math_dtype).transpose(-1, -2)) * scale
    return scores if key_mask is None else scores.masked_fill(~key_mask, float("-inf"))


def flash_like_attention_fn(query, key, value, attn_mask=None):
    """For the repo's attention hook: (B, H, L, D) tensors, boolean key mask."""
    return FlashLikeAttention.apply(query, key, value, attn_mask)


def _diffusers_flash_like(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False, _parallel_config=None):
    """For diffusers' attention dispatch: (B, L, H, D) tensors."""
    if dropout_p or is_causal:
        raise ValueError("the planner's attention stand-in supports neither dropout nor causal masks")
    if attn_mask is not None and attn_mask.ndim == 2:
        attn_mask = attn_mask[:, None, None, :]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return FlashLikeAttention.apply(q, k, v, attn_mask, scale).transpose(1, 2)


FLASH_LIKE_BACKEND = "planner-flash-like"


@contextlib.contextmanager
def flash_like_attention():
    """Route every attention call of both backbones through FlashLikeAttention while inside; then restore.

    HappyHorse: the repo's hook (models/attention.py). diffusers' Wan: its dispatch registry has no public
    way to add a backend (names are an enum), so the active backend's entry is swapped and put back.
    """
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

    attention_hook.register_attention_backend(FLASH_LIKE_BACKEND, flash_like_attention_fn)
    active = registry._active_backend
    saved_entry = (registry._backends[active], registry._supported_arg_names[active], registry._constraints.get(active))
    registry._backends[active] = _diffusers_flash_like
    registry._supported_arg_names[active] = set(inspect.signature(_diffusers_flash_like).parameters)
    registry._constraints[active] = []
    try:
        with attention_hook.using_attention_backend(FLASH_LIKE_BACKEND):
            yield
    finally:
        registry._backends[active], registry._supported_arg_names[active], registry._constraints[active] = saved_entry


# --- autocast on any device --------------------------------------------------------------------------------
# The ops torch.autocast runs in bf16 (its "lower precision" list) that these models use.
_AUTOCAST_LOWER_PRECISION = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.mm, torch.bmm,
                             torch.Tensor.matmul, torch.Tensor.__matmul__}


class EmulatedAutocast(TorchFunctionMode):
    """bf16 autocast for matmul-class ops on any device (the meta device has none of its own): their float32
    inputs are cast to bf16 first, visibly to autograd, so what the op saves are the bf16 casts, as under
    `torch.autocast`. E.g. peft casts a LoRA's input to the adapter's fp32, and autocast casts it back: one
    extra bf16 copy of the input per adapted layer. Ops autocast runs in fp32 are not emulated."""

    def __enter__(self):
        # models/fused_linear.py asks torch for the autocast dtype, which the meta device cannot say: it is told.
        self._fused_linears = emulated_autocast(COMPUTE_DTYPE)
        self._fused_linears.__enter__()
        return super().__enter__()

    def __exit__(self, *exception):
        super().__exit__(*exception)
        self._fused_linears.__exit__(*exception)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _AUTOCAST_LOWER_PRECISION:
            args, kwargs = tree_map(_autocast_cast, (args, kwargs))
        return func(*args, **kwargs)


def _autocast_cast(value):
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float32, torch.float16):
        return value.to(COMPUTE_DTYPE)
    return value


# --- activations: what autograd saves --------------------------------------------------------------------
OUTSIDE = "outside"  # the ledger scope for tensors saved outside every repeated block


class SavedTensorLedger:
    """Records what autograd saves for backward, by scope (a block index, or OUTSIDE).

    Memory is counted per storage, once (a view of a saved tensor holds its whole storage); `copied` counts
    each save's own elements, which is what `torch.autograd.graph.save_on_cpu` would copy to the host.
    Parameters and buffers are not activations and are left out.
    """

    def __init__(self, model: torch.nn.Module):
        self.excluded = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
        self.scope: object = OUTSIDE
        self.unique: dict[object, dict[int, int]] = defaultdict(dict)  # scope -> storage -> bytes
        self.copied: dict[object, int] = defaultdict(int)  # scope -> bytes
        self.largest = 0
        self.linear_flops = 0  # filled in by the caller's FLOP counter
        self.attention_flops = 0
        self.attention_output_bytes = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self.excluded:
            nbytes = tensor.untyped_storage().nbytes()
            self.unique[self.scope][key] = nbytes
            self.copied[self.scope] += tensor.numel() * tensor.element_size()
            self.largest = max(self.largest, nbytes)
        return tensor  # kept as is: autograd holds it, so its storage (and key) stays unique while we count

    def bytes_in(self, scope) -> int:
        return sum(self.unique[scope].values())

    def total_bytes(self) -> int:  # a storage saved in several scopes counts once
        return sum({key: nbytes for storages in self.unique.values() for key, nbytes in storages.items()}.values())

    @contextlib.contextmanager
    def recording(self, blocks: list[torch.nn.Module]):
        def enter(index):
            return lambda module, args: setattr(self, "scope", index)

        handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
        handles += [b.register_forward_hook(lambda module, args, out: setattr(self, "scope", OUTSIDE)) for b in blocks]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
                yield self
        finally:
            for handle in handles:
                handle.remove()


def _storage_key(tensor: torch.Tensor) -> int:
    # The storage object's address: unique among live storages on every device, meta included (data_ptr() is 0 there).
    return tensor.untyped_storage()._cdata


@dataclass
class ActivationProfile:
    """Bytes autograd saves in one training forward (batch included), measured on the meta device."""

    video_tokens: int  # per sample
    text_tokens: int  # per sample
    batch_size: int
    num_blocks: int
    saved_total: int  # no checkpointing: every saved tensor
    saved_outside_blocks: int  # embeddings, output head, loss
    saved_per_block: list[int]  # no checkpointing, each block's own
    boundary: int  # full checkpointing: the saved block inputs (shared ones such as RoPE tables once)
    boundary_copied: int  # the same counted once per block (shared inputs too)
    largest_saved: int  # the biggest single saved tensor
    linear_flops: int  # forward matmul FLOPs outside attention
    attention_flops: int  # forward attention FLOPs
    attention_outputs: int  # attention's outputs and log-sum-exps, all blocks (what saved_attention_blocks keeps)

    @property
    def sequence_tokens(self) -> int:
        return self.video_tokens + self.text_tokens

    def per_token_per_block(self) -> float:
        return max(self.saved_per_block) / (self.batch_size * self.sequence_tokens)

    def boundary_per_block(self) -> int:
        """One block's checkpointed inputs, shared ones included."""
        return self.boundary_copied // self.num_blocks

    def shared_block_inputs(self) -> int:
        """Inputs every block gets (RoPE tables, time modulation, mask): counted once in `boundary`, once per
        block in `boundary_copied`, so the difference is (blocks - 1) copies of them."""
        return (self.boundary_copied - self.boundary) // max(self.num_blocks - 1, 1)

    def hidden_states(self) -> int:
        """The blocks' own inputs, their hidden states, all blocks: what activation offload moves to host RAM."""
        return self.boundary - self.shared_block_inputs()


def default_text_tokens(preset: dict) -> int:
    return int(preset.get("sample", {}).get("max_sequence_length", 512))


def measure_activations(preset: dict | str, width: int, height: int, frames: int, batch_size: int = 1,
                        lora_rank: int | None = 32, text_tokens: int | None = None) -> ActivationProfile:
    """Run the preset's training forward and loss on the meta device at the real shape, twice (without and
    with gradient checkpointing), and count what autograd saves: what a GPU training step saves, up to the
    approximations the planner package's docstring lists."""
    preset, (t, h, w), text_tokens, inputs = _meta_inputs(preset, width, height, frames, batch_size, text_tokens)
    model = meta_training_transformer(preset, lora_rank)
    spec = get_spec(preset["backbone"], text_tokens)  # Wan pads the prompt to this length
    blocks = repeated_blocks(model)

    plain = _count_saved(model, blocks, spec, inputs, checkpointing=False)
    checkpointed = _count_saved(model, blocks, spec, inputs, checkpointing=True)
    return ActivationProfile(
        video_tokens=spec.num_tokens(model, (t, h, w)), text_tokens=text_tokens, batch_size=batch_size,
        num_blocks=len(blocks), saved_total=plain.total_bytes(), saved_outside_blocks=plain.bytes_in(OUTSIDE),
        saved_per_block=[plain.bytes_in(i) for i in range(len(blocks))],
        # Outside the blocks both runs save the same; what checkpointing adds there are the block inputs.
        boundary=checkpointed.bytes_in(OUTSIDE) - plain.bytes_in(OUTSIDE),
        boundary_copied=checkpointed.copied[OUTSIDE] - plain.copied[OUTSIDE],
        largest_saved=plain.largest, linear_flops=plain.linear_flops, attention_flops=plain.attention_flops,
        attention_outputs=plain.attention_output_bytes,
    )


def _meta_inputs(preset, width, height, frames, batch_size, text_tokens):
    """(preset as a dict, latent (t, h, w), text tokens, the transformer's meta inputs) for a clip size."""
    preset = load_preset(preset) if isinstance(preset, str) else preset
    channels, t, h, w = latent_shape(preset, width, height, frames)
    text_tokens = text_tokens or default_text_tokens(preset)
    # float32, as the trainer feeds them; with an image-to-video model's extra input channels (no image tokens)
    channels_in = preset["transformer"].get("in_channels", channels)
    inputs = dict(
        noisy_latents=torch.empty(batch_size, channels_in, t, h, w, device="meta"),
        timesteps=torch.empty(batch_size, device="meta"),
        text_states=torch.empty(batch_size, text_tokens, preset["transformer"]["text_dim"], device="meta"),
        text_mask=None,  # unpadded text: the trainer passes no mask then (training/step.py)
    )
    return preset, (t, h, w), text_tokens, inputs


def _count_saved(model, blocks, spec, inputs, checkpointing: bool) -> SavedTensorLedger:
    (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()
    ledger = SavedTensorLedger(model)
    _ATTENTION_FLOPS[0] = _ATTENTION_OUTPUT_BYTES[0] = 0
    with warnings.catch_warnings():
        # fp32 norm weights meeting bf16 inputs (a full fine-tune): torch says it takes the composite path, as on a GPU
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        flops = _forward_and_loss(model, blocks, spec, inputs, ledger)
    # On meta the attention stand-in does no matmuls, so the counter sees only the linear layers.
    ledger.linear_flops = flops.get_total_flops()
    ledger.attention_flops = _ATTENTION_FLOPS[0]
    ledger.attention_output_bytes = _ATTENTION_OUTPUT_BYTES[0]
    model.disable_gradient_checkpointing()
    return ledger


def _forward_and_loss(model, blocks, spec, inputs, ledger):
    """One training forward and loss, recorded by the ledger; returns the FLOP counter. (Autograd holds every
    saved tensor until this returns, so no counted storage is freed and its key reused while counting.)"""
    from torch.utils.flop_counter import FlopCounterMode

    with flash_like_attention(), FlopCounterMode(display=False) as flops, ledger.recording(blocks), EmulatedAutocast():
        prediction = spec.predict_velocity(model, **inputs)
        F.mse_loss(prediction.float(), torch.empty(prediction.shape, device="meta"))  # the loss saves too
    return flops


# --- inference: what a no-grad forward holds at its peak ---------------------------------------------------
class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors that ops create while inside, counted per storage (views share theirs) and
    released when the last tensor on a storage is garbage: on the meta device, what a caching allocator would
    have handed out at the worst moment. Storages of `existing` tensors (weights, inputs) are not counted."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self._excluded = {_storage_key(t) for t in existing}
        self._storages: dict[int, list[int]] = {}  # storage key -> [bytes, live tensors on it]
        self._tracked: set[int] = set()  # ids of live tensors already counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if id(tensor) in self._tracked or key in self._excluded:
            return  # an in-place op's own input, or a view of a weight or input
        if key not in self._storages:
            self._storages[key] = [tensor.untyped_storage().nbytes(), 0]
            self.live += self._storages[key][0]
            self.peak = max(self.peak, self.live)
        self._storages[key][1] += 1
        self._tracked.add(id(tensor))
        weakref.finalize(tensor, self._release, key, id(tensor))

    def _release(self, key: int, tensor_id: int) -> None:
        self._tracked.discard(tensor_id)
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]


def measure_inference_peak(preset: dict | str, width: int, height: int, frames: int, batch_size: int = 2,
                           text_tokens: int | None = None, ffn_chunk_tokens: int = 0) -> int:
    """Peak bytes one no-grad transformer forward allocates beyond its weights and inputs, as sampling and
    validation run it eagerly (bf16 weights; batch 2 = a guided step, conditional and unconditional together),
    with attention allocating what a flash / cuDNN kernel does (its output and log-sum-exp), and the MLPs in
    chunks of `ffn_chunk_tokens` if set (sample.py's memory.ffn_chunk_tokens). Meta device."""
    from happyhorse_train.memory.ffn_chunks import chunk_feed_forwards

    preset, _, _, inputs = _meta_inputs(preset, width, height, frames, batch_size, text_tokens)
    model, spec = meta_transformer(preset)
    if ffn_chunk_tokens:
        chunk_feed_forwards(model, spec.feed_forward_classes, ffn_chunk_tokens)
    inputs["noisy_latents"] = inputs["noisy_latents"].to(COMPUTE_DTYPE)  # the pipeline feeds the weights' dtype
    inputs["text_states"] = inputs["text_states"].to(COMPUTE_DTYPE)
    existing = [*model.parameters(), *model.buffers(), *(v for v in inputs.values() if v is not None)]
    with torch.no_grad(), flash_like_attention(), LiveTensorBytes(existing) as tracker:
        spec.predict_velocity(model, **inputs)
    return tracker.peak


def measure_vae_peaks(preset: dict | str, width: int, height: int, frames: int) -> dict[str, int]:
    """Peak bytes the VAE's encode of one clip and decode of one latent allocate beyond its weights, as the
    cache and the pipeline run it (float32, no grad). Meta device; the preset's VAE config (diffusers'
    default, the Wan 2.1 VAE, for presets that leave it to the model folder)."""
    preset = load_preset(preset) if isinstance(preset, str) else preset
    _, vae = meta_encoders(preset)
    channels, t, h, w = latent_shape(preset, width, height, frames)
    if channels != vae.config.z_dim:
        raise ValueError(f"the {preset.get('preset')} preset does not describe its VAE ({channels} latent channels)")
    weights = [*vae.parameters(), *vae.buffers()]
    peaks = {}
    for name, run, shape in (("encode", vae.encode, (1, 3, frames, height, width)),
                             ("decode", vae.decode, (1, channels, t, h, w))):
        given = torch.empty(shape, device="meta")
        with torch.no_grad(), LiveTensorBytes([*weights, given]) as tracker:
            run(given)
        peaks[name] = tracker.peak
    return peaks
