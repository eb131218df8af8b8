"""Memory planner: the peak GPU memory, host RAM and step time of candidate training settings, and the
fastest setting that fits.

Nothing here is a per-model formula. The numbers come from the model itself, built on the meta device
(shapes only, no memory): parameter and LoRA byte counts from its tensors, and activation bytes from what
autograd saves during a real-shaped training forward (`measure_activations`). Attention is routed through
`FlashLikeAttention`, which saves what a flash / cuDNN kernel saves (q, k, v, output, log-sum-exp), so the
count has no tokens x tokens term that a real kernel never stores. The model is in the trainer's state (bf16
frozen base + fp32 LoRA, or fp32 weights for a full fine-tune) under an emulation of bf16 autocast for the
matmul-class ops (`EmulatedAutocast`), so the bf16 casts autocast makes are what gets counted, as on a GPU.
What is not measured (bandwidths, kernel rates, dequantization cost, allocator overhead) is a named constant
below, labelled as an assumption.

Known approximations: the meta device runs PyTorch's composite RMSNorm (it keeps float32 copies of its input),
where CUDA's fused kernel keeps less (about 12% of a block's saved bytes for the 8b preset in pure bf16);
autocast's float32 ops are not emulated; quantized layers are assumed to save what bf16 ones save; with
DeepSpeed a full fine-tune's weights are bf16, so the measured bf16 weight casts are counted in excess.

Candidate settings are described by the config overrides a user passes (`Setting.overrides`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from happyhorse_train.errors import UserInputError
from happyhorse_train.models import attention as attention_hook
from happyhorse_train.models.geometry import video_latent_shape
from happyhorse_train.models.presets import load_preset
from happyhorse_train.models.spec import get_spec

GiB = 2**30

# --- assumptions: each stands in for a measurement we do not have yet ---------------------------------
COMPUTE_DTYPE = torch.bfloat16  # training compute precision (trainer.mixed_precision=bf16)
# CUDA context, cuBLAS/cuDNN workspaces and allocator slack before the first tensor: 0.5-1 GiB on recent drivers.
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
# Kept free on the card for fragmentation and estimate error: 10% of it, at least 1.5 GiB.
GPU_MARGIN_FRACTION, GPU_MARGIN_MIN_BYTES = 0.10, int(1.5 * GiB)
HOST_MARGIN_FRACTION = 0.10  # of host RAM kept for the OS, page cache and data loader workers
HOST_PROCESS_BYTES = 3 * GiB  # python + torch + CUDA libraries, per training process
# The backward's working set beyond the saved tensors: the gradient flowing into and out of the op that
# saved the largest tensor, i.e. this many copies of that tensor.
BACKWARD_TRANSIENT_COPIES = 2
# bf16 FLOP/s a training step achieves. Calibrated on DESIGN.md section 5: the hand-written LoRA step for an
# 8.2B DiT at 41,850 tokens does 6.2e15 FLOPs (6NT-style count with recompute) in 14.1 s on an H200.
ACHIEVED_FLOPS = 440e12
PCIE_BYTES_PER_S = 25e9  # host <-> GPU, PCIe 5 x16 effective, each direction (full duplex)
INTERCONNECT_BYTES_PER_S = 150e9  # NCCL bus bandwidth between GPUs of one node: NVLink class (PCIe-only: ~10x less)
CPU_ADAM_PARAMS_PER_S = 1e9  # DeepSpeed CPUAdam parameters updated per second, per process
DEEPSPEED_BUCKET_BYTES = 1 * GiB  # DeepSpeed reduce / all-gather buckets per GPU
PREFETCHED_BLOCKS = 2  # blocks' weights in flight with block swap, ZeRO-3 (the one in use + the next)
# Matmul time of each frozen-base format relative to bf16 (dequantization). Unmeasured guesses: replace them
# with benchmarks/ numbers when those exist.
DEQUANT_SLOWDOWN = {"bf16": 1.00, "fp8": 1.05, "fp8-block": 1.08, "int8": 1.15, "nf4": 1.20}
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize: one float32 absmax per 64 values (no double quantization)
FP8_SCALE_BLOCK = 128  # fp8-block: one float32 scale per 128 x 128 tile of a weight

BASE_FORMATS = tuple(DEQUANT_SLOWDOWN)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2}  # per trainable parameter: two fp32 / two 8-bit moments
# torch's foreach AdamW builds sqrt(v) for all parameters at once: one fp32 temporary per parameter.
OPTIMIZER_STEP_TEMP_BYTES = {"adamw": 4, "adamw8bit": 0}
ACCELERATE_CONFIGS = ("multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload")  # configs/accelerate/
# Preset VAEs that leave their config to the model folder: latent channels -> (spatial, temporal) compression.
VAE_FACTORS_BY_LATENT_CHANNELS = {16: (8, 4), 48: (16, 4)}  # Wan 2.1 VAE, Wan 2.2 VAE

DEFAULT_SETTING_NOTE = "bf16 base, gradient checkpointing on, no activation offload, no block swap, adamw"


# --- the request and the model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanRequest:
    preset: str  # a configs/model/*.yaml name, or a path to one
    gpu_memory_gib: float  # per GPU
    host_ram_gib: float  # of the machine (all training processes share it)
    width: int
    height: int
    frames: int
    num_gpus: int = 1
    batch_size: int = 1  # per GPU
    lora_rank: int | None = 32  # None: full fine-tune
    text_tokens: int | None = None  # prompt tokens per sample; None: the preset's sample.max_sequence_length
    encoders_in_host_ram: bool = True  # the text encoder and VAE stay in host RAM after caching (for validation)
    tflops: float = ACHIEVED_FLOPS / 1e12
    pcie_gbps: float = PCIE_BYTES_PER_S / 1e9

    @property
    def mode(self) -> str:
        return "full" if self.lora_rank is None else "lora"


def parse_size(text: str) -> tuple[int, int, int]:
    """'720x480x121' -> (width, height, frames)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserInputError(f"size {text!r} is not WIDTHxHEIGHTxFRAMES with positive integers, e.g. 720x480x121")
    width, height, frames = (int(p) for p in parts)
    return width, height, frames


def latent_shape(preset: dict, width: int, height: int, frames: int) -> tuple[int, int, int, int]:
    """(channels, frames, height, width) of one clip's latent; a UserInputError naming valid sizes otherwise."""
    transformer = preset["transformer"]
    vae = preset.get("vae") or {}
    channels = transformer.get("in_channels", 16)
    spatial, temporal = VAE_FACTORS_BY_LATENT_CHANNELS.get(channels, (8, 4))
    # The geometry check reads these pipeline attributes; the planner has no pipeline, only the preset.
    pipe_like = SimpleNamespace(
        vae_scale_factor_spatial=vae.get("scale_factor_spatial", spatial),
        vae_scale_factor_temporal=vae.get("scale_factor_temporal", temporal),
        transformer=SimpleNamespace(config=SimpleNamespace(patch_size=transformer["patch_size"], in_channels=channels)),
    )
    return video_latent_shape(pipe_like, height, width, frames)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def meta_transformer(preset: dict, lora_rank: int | None = None, dtype: torch.dtype = COMPUTE_DTYPE):
    """The preset's transformer on the meta device, its weights in `dtype`, with a peft LoRA when given a rank.

    Built in `dtype` directly rather than cast: the same tensors, without diffusers' warning about `.to()`.
    """
    import peft

    spec = get_spec(preset["backbone"])
    with torch.device("meta"), _default_dtype(dtype):
        model = spec.transformer_class(**preset["transformer"])
        _keep_in_fp32_as_loaded(model)
        model.requires_grad_(lora_rank is None)
        if lora_rank is not None:
            config = peft.LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=spec.default_lora_targets)
            model.add_adapter(config)
    return model, spec


def _keep_in_fp32_as_loaded(model: torch.nn.Module) -> None:
    """What diffusers' from_pretrained(torch_dtype=bf16) does: modules the class names in
    `_keep_in_fp32_modules` (Wan: RoPE, time embedder, norms, modulation table) stay float32."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if keep.intersection(name.split(".")) and tensor.is_floating_point():
            tensor.data = tensor.data.float()


def meta_training_transformer(preset: dict, lora_rank: int | None) -> torch.nn.Module:
    """The transformer on the meta device in the state the trainer trains it (training/adapters.py): a LoRA's
    frozen base in bf16 and its adapters in fp32; for a full fine-tune, every weight fp32 and trainable."""
    model, _ = meta_transformer(preset, lora_rank, COMPUTE_DTYPE if lora_rank is not None else torch.float32)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model.train()


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, in order (diffusers' `_repeated_blocks` names their class)."""
    names = set(getattr(model, "_repeated_blocks", []))
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no repeated blocks (_repeated_blocks)")
    return blocks


def quantized_linear_bytes(base_format: str, out_features: int, in_features: int) -> int:
    """Bytes of one Linear weight stored in a frozen-base format (scales included, bias not)."""
    n = out_features * in_features
    if base_format == "bf16":
        return 2 * n
    if base_format == "int8":  # bitsandbytes LLM.int8: int8 values + one fp32 scale per output row
        return n + 4 * out_features
    if base_format == "nf4":  # bitsandbytes: two values per byte + one fp32 absmax per block
        return math.ceil(n / 2) + 4 * math.ceil(n / NF4_BLOCK)
    if base_format == "fp8":  # e4m3 values + one fp32 scale per tensor
        return n + 4
    if base_format == "fp8-block":  # e4m3 values + one fp32 scale per 128 x 128 tile
        return n + 4 * math.ceil(out_features / FP8_SCALE_BLOCK) * math.ceil(in_features / FP8_SCALE_BLOCK)
    raise ValueError(f"unknown base format {base_format!r}; known: {', '.join(BASE_FORMATS)}")


def block_bytes_by_format(block: torch.nn.Module) -> dict[str, int]:
    """A block's weight bytes for each base format: its Linear weights quantized, everything else bf16."""
    linear_weights = {id(m.weight): m for m in block.modules() if type(m) is torch.nn.Linear}
    result = {}
    for base_format in BASE_FORMATS:
        total = 0
        for param in block.parameters():
            if id(param) in linear_weights:
                total += quantized_linear_bytes(base_format, *param.shape)
            else:
                total += 2 * param.numel()
        result[base_format] = total
    return result


@dataclass
class ModelFacts:
    """Exact parameter counts of a preset's transformer (and its encoders), from its meta-device tensors."""

    preset: str
    backbone: str
    total_params: int
    lora_params: int  # 0 for a full fine-tune
    block_params: list[int]  # per repeated block
    block_bytes: list[dict[str, int]]  # per repeated block: weight bytes per base format
    largest_tensor_params: int  # the biggest single weight (a streaming loader holds one at a time)
    text_encoder_params: int
    vae_params: int

    @property
    def num_blocks(self) -> int:
        return len(self.block_params)

    @property
    def other_params(self) -> int:  # outside the repeated blocks: never quantized, never swapped
        return self.total_params - sum(self.block_params)

    @property
    def trainable_params(self) -> int:
        return self.lora_params or self.total_params

    def base_bytes(self, base_format: str) -> int:
        """The frozen base's bytes in a format (the other parameters stay bf16)."""
        return sum(b[base_format] for b in self.block_bytes) + 2 * self.other_params


def model_facts(preset: dict, lora_rank: int | None) -> ModelFacts:
    model, _ = meta_transformer(preset)
    blocks = repeated_blocks(model)
    total = sum(p.numel() for p in model.parameters())
    lora_params = 0
    if lora_rank is not None:
        with_lora, _ = meta_transformer(preset, lora_rank)
        lora_params = sum(p.numel() for p in with_lora.parameters() if p.requires_grad)
    text_encoder, vae = _meta_encoders(preset)
    return ModelFacts(
        preset=preset.get("preset", "custom"),
        backbone=preset["backbone"],
        total_params=total,
        lora_params=lora_params,
        block_params=[sum(p.numel() for p in b.parameters()) for b in blocks],
        block_bytes=[block_bytes_by_format(b) for b in blocks],
        largest_tensor_params=max(p.numel() for p in model.parameters()),
        text_encoder_params=sum(p.numel() for p in text_encoder.parameters()),
        vae_params=sum(p.numel() for p in vae.parameters()),
    )


def _meta_encoders(preset: dict):
    """The text encoder and VAE on the meta device. Presets that leave them to the model folder (Wan) get
    the 8b preset's UMT5-XXL dimensions and diffusers' default VAE (an approximation for the Wan 2.2 VAE)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    text_config = preset.get("text_encoder") or load_preset("8b")["text_encoder"]
    vocab = (preset.get("tokenizer") or {}).get("vocab_size") or text_config.get("vocab_size", 256384)
    with torch.device("meta"):
        text_encoder = UMT5EncoderModel(UMT5Config(**{**text_config, "vocab_size": vocab}))
        vae = AutoencoderKLWan(**(preset.get("vae") or {}))
    return text_encoder, vae


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
            probs, lse = _attention_probs(q, _expand_heads(k, q), key_mask, scale)
            out = (probs @ _expand_heads(v, q).to(probs.dtype)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.key_mask, ctx.scale = key_mask, scale  # the mask is an input (flash: tiny sequence offsets)
        _ATTENTION_FLOPS[0] += 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        math_dtype = _math_dtype(q)
        q_math = q.to(math_dtype)
        k_full, v_full = _expand_heads(k, q).to(math_dtype), _expand_heads(v, q).to(math_dtype)
        scores = (q_math @ k_full.transpose(-1, -2)) * ctx.scale
        if ctx.key_mask is not None:
            scores = scores.masked_fill(~ctx.key_mask, float("-inf"))
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


def _expand_heads(kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)  # grouped-query heads, as SDPA's enable_gqa


def _sum_heads(grad: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    b, _, length, dim = grad.shape
    return grad.reshape(b, kv.shape[1], -1, length, dim).sum(2)


def _math_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)  # at least float32, as the kernels accumulate


def _attention_probs(q, k_full, key_mask, scale):
    math_dtype = _math_dtype(q)
    scores = (q.to(math_dtype) @ k_full.to(math_dtype).transpose(-1, -2)) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    lse = scores.logsumexp(-1)
    return torch.exp(scores - lse.unsqueeze(-1)), lse  # float32 for 16-bit inputs, as flash keeps it


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
    previous_hook = attention_hook._active_backend
    active = registry._active_backend
    saved_entry = (registry._backends[active], registry._supported_arg_names[active], registry._constraints.get(active))
    attention_hook.set_attention_backend(FLASH_LIKE_BACKEND)
    registry._backends[active] = _diffusers_flash_like
    registry._supported_arg_names[active] = set(inspect.signature(_diffusers_flash_like).parameters)
    registry._constraints[active] = []
    try:
        yield
    finally:
        attention_hook.set_attention_backend(previous_hook)
        registry._backends[active], registry._supported_arg_names[active], registry._constraints[active] = saved_entry


# --- autocast on any device --------------------------------------------------------------------------------
# The ops torch.autocast runs in bf16 (its "lower precision" list) that these models use.
_AUTOCAST_LOWER_PRECISION = {
    F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.mm, torch.bmm, torch.Tensor.matmul,
    torch.Tensor.__matmul__,
}


class EmulatedAutocast(TorchFunctionMode):
    """bf16 autocast for matmul-class ops on any device (the meta device has none of its own): their float32
    inputs are cast to bf16 first, visibly to autograd, so what the op saves are the bf16 casts, as under
    `torch.autocast`. E.g. peft casts a LoRA's input to the adapter's fp32, and autocast casts it back: one
    extra bf16 copy of the input per adapted layer. Ops autocast runs in fp32 are not emulated."""

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

    def total_bytes(self) -> int:
        every = {}
        for storages in self.unique.values():
            every.update(storages)
        return sum(every.values())

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
    # The address of the storage object: unique among live storages on every device, meta included
    # (where data_ptr() is 0 for all).
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


def measure_activations(
    preset: dict | str,
    width: int,
    height: int,
    frames: int,
    batch_size: int = 1,
    lora_rank: int | None = 32,
    text_tokens: int | None = None,
) -> ActivationProfile:
    """Run the preset's training forward and loss on the meta device at the real shape, twice (without and
    with gradient checkpointing), and count what autograd saves. The model is in the trainer's state with
    bf16 autocast emulated for matmuls and attention saving what a flash kernel saves, so autograd saves
    what a GPU training step saves (up to the approximations in the module docstring)."""
    preset = load_preset(preset) if isinstance(preset, str) else preset
    channels, t, h, w = latent_shape(preset, width, height, frames)
    text_tokens = text_tokens or default_text_tokens(preset)
    model = meta_training_transformer(preset, lora_rank)
    spec = get_spec(preset["backbone"], text_tokens)  # Wan pads the prompt to this length
    blocks = repeated_blocks(model)
    inputs = _meta_inputs(preset, batch_size, (channels, t, h, w), text_tokens)

    plain = _count_saved(model, blocks, spec, inputs, checkpointing=False)
    checkpointed = _count_saved(model, blocks, spec, inputs, checkpointing=True)
    return ActivationProfile(
        video_tokens=spec.num_tokens(model, (t, h, w)),
        text_tokens=text_tokens,
        batch_size=batch_size,
        num_blocks=len(blocks),
        saved_total=plain.total_bytes(),
        saved_outside_blocks=plain.bytes_in(OUTSIDE),
        saved_per_block=[plain.bytes_in(i) for i in range(len(blocks))],
        # Outside the blocks both runs save the same; what checkpointing adds there are the block inputs.
        boundary=checkpointed.bytes_in(OUTSIDE) - plain.bytes_in(OUTSIDE),
        boundary_copied=checkpointed.copied[OUTSIDE] - plain.copied[OUTSIDE],
        largest_saved=plain.largest,
        linear_flops=plain.linear_flops,
        attention_flops=plain.attention_flops,
    )


def _meta_inputs(preset: dict, batch_size: int, latent: tuple[int, ...], text_tokens: int) -> dict:
    meta = {"device": "meta"}
    return dict(
        noisy_latents=torch.empty(batch_size, *latent, **meta),  # float32, as the trainer feeds them
        timesteps=torch.empty(batch_size, **meta),
        text_states=torch.empty(batch_size, text_tokens, preset["transformer"]["text_dim"], **meta),
        text_mask=torch.ones(batch_size, text_tokens, dtype=torch.bool, **meta),
    )


def _count_saved(model, blocks, spec, inputs, checkpointing: bool) -> SavedTensorLedger:
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    ledger = SavedTensorLedger(model)
    _ATTENTION_FLOPS[0] = 0
    with warnings.catch_warnings():
        # fp32 norm weights meeting bf16 inputs (a full fine-tune): torch says it takes the composite path, as on a GPU
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        flops = _forward_and_loss(model, blocks, spec, inputs, ledger)
    # On meta the attention stand-in does no matmuls, so the counter sees only the linear layers.
    ledger.linear_flops = flops.get_total_flops()
    ledger.attention_flops = _ATTENTION_FLOPS[0]
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


# --- candidate settings and their estimates --------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One way to train, as the config overrides that select it."""

    base_weights: str = "bf16"  # memory.base_weights: storage of the frozen base (a full fine-tune trains bf16/fp32)
    gradient_checkpointing: bool = True  # trainer.gradient_checkpointing
    offload_activations: bool = False  # memory.offload_activations: blocks' hidden-state inputs in pinned host RAM
    blocks_to_swap: int = 0  # memory.blocks_to_swap: blocks whose weights live in pinned host RAM
    optimizer: str = "adamw"  # optimizer.name
    accelerate_config: str | None = None  # configs/accelerate/<name>.yaml for several GPUs

    def overrides(self) -> list[str]:
        return [
            f"memory.base_weights={self.base_weights}",
            f"trainer.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
            f"memory.offload_activations={str(self.offload_activations).lower()}",
            f"memory.blocks_to_swap={self.blocks_to_swap}",
            f"optimizer.name={self.optimizer}",
        ]

    def changed_overrides(self) -> list[str]:
        """The overrides that differ from the defaults (what the table shows)."""
        defaults = Setting().overrides()
        changed = [o for o, d in zip(self.overrides(), defaults) if o != d]
        if self.accelerate_config:
            changed.append(f"[{self.accelerate_config}]")
        return changed

    def accelerate_file(self) -> str | None:
        return f"configs/accelerate/{self.accelerate_config}.yaml" if self.accelerate_config else None


@dataclass
class Estimate:
    """A setting's estimated peak GPU memory (per GPU), peak host RAM (the machine) and step time."""

    setting: Setting
    gpu_terms: dict[str, int]  # bytes at the peak moment, by what holds them
    gpu_peak_moment: str
    host_terms: dict[str, int]
    host_peak_moment: str
    time_terms: dict[str, float]  # seconds
    gpu_budget: int
    host_budget: int

    @property
    def gpu_peak(self) -> int:
        return sum(self.gpu_terms.values())

    @property
    def host_peak(self) -> int:
        return sum(self.host_terms.values())

    @property
    def step_seconds(self) -> float:
        return sum(self.time_terms.values())

    @property
    def fits_gpu(self) -> bool:
        return self.gpu_peak <= self.gpu_budget

    @property
    def fits_host(self) -> bool:
        return self.host_peak <= self.host_budget

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def verdict(self) -> str:
        if self.fits:
            return "yes"
        return "no: " + " and ".join(n for n, ok in (("GPU", self.fits_gpu), ("host RAM", self.fits_host)) if not ok)


def gpu_budget(gpu_memory_gib: float) -> int:
    total = gpu_memory_gib * GiB
    return int(total - max(GPU_MARGIN_FRACTION * total, GPU_MARGIN_MIN_BYTES))


def host_budget(host_ram_gib: float) -> int:
    return int(host_ram_gib * GiB * (1 - HOST_MARGIN_FRACTION))


@dataclass
class Layout:
    """Where a setting keeps the model's long-lived tensors, in bytes per GPU (host: the whole machine)."""

    weights: int  # on the GPU: base / model weights resident, in-flight blocks included
    master: int = 0  # on the GPU: trained weights in fp32 that only the optimizer reads (LoRA, DeepSpeed)
    grads: int = 0  # on the GPU at the end of backward
    states: int = 0  # optimizer states on the GPU
    step_temp: int = 0  # the optimizer step's temporaries on the GPU
    comm_buffers: int = 0
    autocast_copies: int = 0  # bf16 casts of fp32 weights on the GPU, which autocast caches through the forward
    host_pinned_per_process: int = 0  # swapped blocks
    host_node: int = 0  # offloaded master weights, gradients, states (and ZeRO-3 offload weights), all processes
    host_transfer_per_pass: int = 0  # bytes each process moves host -> GPU per forward / backward pass (weights)


def _layout(request: PlanRequest, setting: Setting, facts: ModelFacts) -> Layout:
    config = setting.accelerate_config or "single"
    if config.startswith("deepspeed"):
        return _deepspeed_layout(request, setting, facts)
    return _replicated_layout(request, setting, facts)


def _replicated_layout(request: PlanRequest, setting: Setting, facts: ModelFacts) -> Layout:
    """One GPU, or DDP: every GPU holds everything; DDP adds gradient buckets the size of the gradients."""
    trainable = facts.trainable_params
    states = OPTIMIZER_STATE_BYTES[setting.optimizer] * trainable
    step_temp = OPTIMIZER_STEP_TEMP_BYTES[setting.optimizer] * trainable
    ddp_buckets = 4 * trainable if setting.accelerate_config == "multi_gpu" else 0
    if request.mode == "full":  # fp32 master weights trained in place, bf16 compute through autocast
        return Layout(weights=4 * trainable, grads=4 * trainable, states=states, step_temp=step_temp,
                      comm_buffers=ddp_buckets, autocast_copies=2 * trainable)
    swapped = _swapped_bytes(facts, setting)
    return Layout(weights=_resident_base(facts, setting), master=4 * trainable, grads=4 * trainable, states=states,
                  step_temp=step_temp, comm_buffers=ddp_buckets, host_pinned_per_process=swapped,
                  host_transfer_per_pass=swapped)


def _deepspeed_layout(request: PlanRequest, setting: Setting, facts: ModelFacts) -> Layout:
    """DeepSpeed's bf16 mode: bf16 model weights; the fp32 master copy, gradients and Adam states partitioned."""
    n, trainable = request.num_gpus, facts.trainable_params
    state_bytes = OPTIMIZER_STATE_BYTES[setting.optimizer]
    if request.mode == "full":
        model_bf16 = 2 * facts.total_params
    else:
        model_bf16 = facts.base_bytes(setting.base_weights) + 2 * trainable
    gathered = PREFETCHED_BLOCKS * max(b["bf16"] for b in facts.block_bytes)
    partitioned = dict(master=4 * trainable // n, grads=4 * trainable // n, states=state_bytes * trainable // n)
    if setting.accelerate_config == "deepspeed_zero2":
        weights = 2 * facts.total_params if request.mode == "full" else _resident_base(facts, setting) + 2 * trainable
        swapped = _swapped_bytes(facts, setting)
        return Layout(weights=weights, comm_buffers=DEEPSPEED_BUCKET_BYTES, host_pinned_per_process=swapped,
                      host_transfer_per_pass=swapped, **partitioned)
    if setting.accelerate_config == "deepspeed_zero3":
        return Layout(weights=model_bf16 // n + gathered, comm_buffers=DEEPSPEED_BUCKET_BYTES, **partitioned)
    # ZeRO-3 offload: weights, master copy, gradients and states in host RAM; the GPU holds the gathered blocks.
    return Layout(weights=gathered, comm_buffers=DEEPSPEED_BUCKET_BYTES,
                  host_node=model_bf16 + (4 + 4 + state_bytes) * trainable, host_transfer_per_pass=model_bf16 // n)


def _swapped_blocks(facts: ModelFacts, setting: Setting) -> list[dict[str, int]]:
    # Conservative: the smallest blocks are the ones swapped (least memory saved).
    return sorted(facts.block_bytes, key=lambda b: b["bf16"])[: setting.blocks_to_swap]


def _swapped_bytes(facts: ModelFacts, setting: Setting) -> int:
    return sum(b[setting.base_weights] for b in _swapped_blocks(facts, setting))


def _resident_base(facts: ModelFacts, setting: Setting) -> int:
    """Frozen base bytes on the GPU: all but the swapped blocks, plus buffers for the blocks in flight."""
    base = facts.base_bytes(setting.base_weights)
    if not setting.blocks_to_swap:
        return base
    in_flight = min(PREFETCHED_BLOCKS, setting.blocks_to_swap) * max(b[setting.base_weights] for b in facts.block_bytes)
    return base - _swapped_bytes(facts, setting) + in_flight


def _activation_moments(setting: Setting, profile: ActivationProfile, layout: Layout) -> dict[str, dict[str, int]]:
    """The GPU's changing contents at the moments one of which is the step's peak.

    Between the start and the end of backward, the kept activations of earlier blocks shrink while the
    gradients of later blocks grow, both about linearly, so their sum peaks at one of the two ends.
    """
    outside = profile.saved_outside_blocks
    transient = BACKWARD_TRANSIENT_COPIES * profile.largest_saved
    if not setting.gradient_checkpointing:
        # All saved; for fp32 weights that includes the bf16 casts each linear saves (measured).
        kept, last_kept, recompute, cached_casts = profile.saved_total - outside, max(profile.saved_per_block), 0, 0
    else:
        one_boundary = profile.boundary_per_block()
        kept = profile.boundary
        if setting.offload_activations:  # on the GPU: the shared inputs and the hidden states of blocks in flight
            kept = profile.shared_block_inputs() + PREFETCHED_BLOCKS * -(-profile.hidden_states() // profile.num_blocks)
        last_kept, recompute = one_boundary, max(profile.saved_per_block)
        cached_casts = layout.autocast_copies  # autocast's cache holds every weight's bf16 cast until the forward ends
    return {
        "forward end": {"activations": kept + outside, "autocast weight copies": cached_casts},
        "backward start": {"activations": kept + outside + recompute, "backward working set": transient},
        "backward end": {"gradients": layout.grads, "activations": last_kept + outside + recompute,
                         "backward working set": transient},
        "optimizer step": {"gradients": layout.grads, "optimizer step temporaries": layout.step_temp},
    }


def _gpu_estimate(setting, profile, layout) -> tuple[str, dict[str, int]]:
    static = {
        "weights": layout.weights,
        "trained fp32 weights": layout.master,
        "optimizer states": layout.states,
        "communication buffers": layout.comm_buffers,
        "CUDA context": CUDA_CONTEXT_BYTES,
    }
    moments = _activation_moments(setting, profile, layout)
    moment = max(moments, key=lambda name: sum(moments[name].values()))
    terms = {**static, **moments[moment]}
    return moment, {name: value for name, value in terms.items() if value}


def _host_estimate(request, setting, facts, profile, layout) -> tuple[str, dict[str, int]]:
    processes = request.num_gpus if setting.accelerate_config else 1
    encoder_dtype_bytes = 2 if request.mode == "lora" else 4  # the pipeline loads in the trained dtype
    encoders = encoder_dtype_bytes * facts.text_encoder_params + 4 * facts.vae_params
    per_process = {
        "processes (python, torch, CUDA)": HOST_PROCESS_BYTES,
        "text encoder + VAE parked": encoders if request.encoders_in_host_ram else 0,
    }
    offloaded = profile.hidden_states() if setting.offload_activations else 0
    training = {
        **{name: processes * value for name, value in per_process.items()},
        "swapped blocks (pinned)": processes * layout.host_pinned_per_process,
        "offloaded activations (pinned)": processes * offloaded,
        "offloaded optimizer / weights": layout.host_node,
    }
    # Loading streams tensor by tensor: one tensor in flight, and a quantized base is built on the host first.
    weight_bytes = 2 if request.mode == "lora" else 4
    in_flight = weight_bytes * facts.largest_tensor_params
    quantized = facts.base_bytes(setting.base_weights) if setting.base_weights != "bf16" else 0
    loading = {
        **{name: processes * value for name, value in per_process.items()},
        "loading: weights being moved": processes * (in_flight + quantized),
    }
    if sum(loading.values()) > sum(training.values()):
        return "loading", {k: v for k, v in loading.items() if v}
    return "training", {k: v for k, v in training.items() if v}


def _step_time(request, setting, profile, layout, facts) -> dict[str, float]:
    """Seconds per step: compute, plus the transfers that compute cannot hide."""
    rate, pcie = request.tflops * 1e12, request.pcie_gbps * 1e9
    linear = profile.linear_flops * DEQUANT_SLOWDOWN[setting.base_weights]
    recompute = 1 if setting.gradient_checkpointing else 0
    linear_backward = 2 if request.mode == "full" else 1  # a frozen base needs no weight gradients
    forward_s = (linear + profile.attention_flops) / rate
    backward_s = (linear * (linear_backward + recompute) + profile.attention_flops * (2 + recompute)) / rate

    offloaded = profile.hidden_states() if setting.offload_activations else 0
    weights_in = layout.host_transfer_per_pass
    # PCIe is full duplex: per pass the busier direction counts; it overlaps that pass's compute.
    forward_pcie = max(weights_in, offloaded) / pcie
    backward_pcie = (weights_in + offloaded) / pcie
    hidden_pcie = max(0.0, forward_pcie - forward_s) + max(0.0, backward_pcie - backward_s)
    terms = {"compute": forward_s + backward_s, "PCIe not hidden": hidden_pcie}
    collectives_s = _collective_bytes(request, setting, facts) / INTERCONNECT_BYTES_PER_S
    terms["GPU-to-GPU not hidden"] = max(0.0, collectives_s - forward_s - backward_s)
    if setting.accelerate_config == "deepspeed_zero3_offload":  # CPU Adam, then the new weights back up
        shard = facts.trainable_params / request.num_gpus
        terms["CPU optimizer step"] = shard / CPU_ADAM_PARAMS_PER_S + 2 * (2 * shard) / pcie
    return {name: value for name, value in terms.items() if value}


def _collective_bytes(request, setting, facts) -> float:
    """Bytes each GPU sends per step in collectives (ring algorithms: (n-1)/n of the data per pass)."""
    n = request.num_gpus
    if not setting.accelerate_config or n == 1:
        return 0.0
    ring = (n - 1) / n
    trainable = facts.trainable_params
    if setting.accelerate_config == "multi_gpu":
        return 2 * ring * 4 * trainable  # all-reduce of fp32 gradients
    if setting.accelerate_config == "deepspeed_zero2":
        return ring * 2 * trainable * 2  # reduce-scatter of bf16 gradients + all-gather of the updated weights
    weights = 2 * facts.total_params  # ZeRO-3: gather the bf16 weights for forward and for backward
    return ring * (2 * weights + 2 * trainable)


def estimate(request: PlanRequest, setting: Setting, facts: ModelFacts, profile: ActivationProfile) -> Estimate:
    layout = _layout(request, setting, facts)
    gpu_moment, gpu_terms = _gpu_estimate(setting, profile, layout)
    host_moment, host_terms = _host_estimate(request, setting, facts, profile, layout)
    return Estimate(
        setting=setting,
        gpu_terms=gpu_terms,
        gpu_peak_moment=gpu_moment,
        host_terms=host_terms,
        host_peak_moment=host_moment,
        time_terms=_step_time(request, setting, profile, layout, facts),
        gpu_budget=gpu_budget(request.gpu_memory_gib),
        host_budget=host_budget(request.host_ram_gib),
    )


# --- the plan --------------------------------------------------------------------------------------------
def candidate_settings(request: PlanRequest) -> list[Setting]:
    """Every combination worth estimating, before block swap is sized (see `plan`).

    Not combined: quantized bases with a full fine-tune (it trains bf16 compute / fp32 master weights) or with
    DeepSpeed (train.py refuses: DeepSpeed casts the whole model to bf16); 8-bit Adam or activation offload
    with DeepSpeed (it partitions its own fp32 states; offload is untested under its hooks and refused);
    activation offload without checkpointing (it offloads the checkpointed block inputs).
    """
    configs = ACCELERATE_CONFIGS if request.num_gpus > 1 else (None,)
    formats = BASE_FORMATS if request.mode == "lora" else ("bf16",)
    optimizers = ("adamw",) if request.mode == "lora" else tuple(OPTIMIZER_STATE_BYTES)  # LoRA states are tiny
    activation_modes = ((False, False), (True, False), (True, True))  # (checkpointing, offload)
    settings = []
    for config in configs:
        for base in formats:
            deepspeed = bool(config and config.startswith("deepspeed"))
            if base != "bf16" and deepspeed:
                continue
            for optimizer in optimizers:
                if optimizer != "adamw" and deepspeed:
                    continue
                for checkpointing, offload in activation_modes:
                    if offload and deepspeed:
                        continue
                    settings.append(Setting(base, checkpointing, offload, 0, optimizer, config))
    return settings


def _can_swap(request: PlanRequest, setting: Setting) -> bool:
    # Block swap streams plain frozen tensors: not a full fine-tune's trained weights, not bitsandbytes' int8 /
    # nf4 tensors (their state lives beside .data; memory/offload.py leaves them in place), and not under
    # DeepSpeed (train.py refuses it there: ZeRO shards instead).
    return (request.mode == "lora" and setting.base_weights not in ("int8", "nf4")
            and setting.accelerate_config in (None, "multi_gpu"))


def _smallest_swap_that_fits(request, setting, facts, profile) -> Estimate | None:
    for blocks in range(1, facts.num_blocks + 1):
        swapped = estimate(request, replace(setting, blocks_to_swap=blocks), facts, profile)
        if swapped.fits_gpu:
            return swapped
    return None


@dataclass
class Plan:
    request: PlanRequest
    facts: ModelFacts
    profile: ActivationProfile
    estimates: list[Estimate]  # fitting ones first, fastest first
    notes: list[str] = field(default_factory=list)

    @property
    def pick(self) -> Estimate | None:
        return self.estimates[0] if self.estimates and self.estimates[0].fits else None

    def why_nothing_fits(self) -> str:
        smallest = min(self.estimates, key=lambda e: e.gpu_peak)
        biggest_terms = sorted(smallest.gpu_terms.items(), key=lambda kv: -kv[1])[:3]
        terms = ", ".join(f"{name} {value / GiB:.1f}" for name, value in biggest_terms)
        return (
            f"no setting fits: the smallest GPU estimate is {smallest.gpu_peak / GiB:.1f} GiB "
            f"({' '.join(smallest.setting.changed_overrides()) or 'defaults'}; largest parts: {terms} GiB) against "
            f"{smallest.gpu_budget / GiB:.1f} GiB usable per GPU, and it needs {smallest.host_peak / GiB:.1f} GiB of "
            f"host RAM against {smallest.host_budget / GiB:.1f} GiB usable; try more or bigger GPUs, more host RAM, "
            f"LoRA instead of a full fine-tune, or a shorter clip"
        )


def _rank(e: Estimate) -> tuple:
    # Fitting ones fastest first (ties: fewer changes from the defaults), then the rest by GPU memory.
    return (not e.fits, e.step_seconds if e.fits else e.gpu_peak, len(e.setting.changed_overrides()))


def plan(request: PlanRequest) -> Plan:
    preset = load_preset(request.preset)
    if request.num_gpus < 1 or request.batch_size < 1:
        raise UserInputError("the number of GPUs and the batch size must be at least 1")
    if request.lora_rank is not None and request.lora_rank < 1:
        raise UserInputError(f"LoRA rank {request.lora_rank} must be at least 1")
    latent_shape(preset, request.width, request.height, request.frames)  # a bad size fails here, before any work
    facts = model_facts(preset, request.lora_rank)
    profile = measure_activations(
        preset, request.width, request.height, request.frames,
        request.batch_size, request.lora_rank, request.text_tokens,
    )
    estimates = []
    for setting in candidate_settings(request):
        plain = estimate(request, setting, facts, profile)
        estimates.append(plain)
        if not plain.fits_gpu and _can_swap(request, setting):
            swapped = _smallest_swap_that_fits(request, setting, facts, profile)
            if swapped is not None:
                estimates.append(swapped)
    estimates.sort(key=_rank)
    return Plan(request, facts, profile, estimates, _notes(request, facts))


def _notes(request: PlanRequest, facts: ModelFacts) -> list[str]:
    encoders = (facts.text_encoder_params * (2 if request.mode == "lora" else 4) + 4 * facts.vae_params) / GiB
    if request.encoders_in_host_ram:
        where = f"kept in host RAM for validation renders: {encoders:.1f} GiB per process, counted"
    else:
        where = "freed after caching, not counted"
    return [
        "Latents and text states are cached before training, so the text encoder and VAE are assumed off the GPU "
        f"while training ({where}).",
        f"Margins: the GPU budget keeps {GPU_MARGIN_FRACTION:.0%} of the card (at least "
        f"{GPU_MARGIN_MIN_BYTES / GiB:.1f} GiB) free; host RAM keeps {HOST_MARGIN_FRACTION:.0%} free. "
        f"CUDA context and allocator overhead is counted as {CUDA_CONTEXT_BYTES / GiB:.2f} GiB.",
        "Activations are measured (meta-device forward, flash-like attention, bf16 autocast emulated). Step times are "
        "relative "
        f"estimates at an assumed {request.tflops:.0f} TFLOP/s and {request.pcie_gbps:.0f} GB/s PCIe; dequantization "
        "costs (" + ", ".join(f"{k} x{v:.2f}" for k, v in DEQUANT_SLOWDOWN.items() if k != "bf16")
        + ") are unmeasured guesses.",
    ]


# --- output ----------------------------------------------------------------------------------------------
def render_plan(result: Plan) -> str:
    request, facts, profile = result.request, result.facts, result.profile
    boundary_per_token = profile.boundary_per_block() / (profile.batch_size * profile.sequence_tokens)
    what = "full fine-tune"
    if request.mode == "lora":
        what = f"LoRA r={request.lora_rank} ({facts.lora_params / 1e6:.1f}M trained)"
    lines = [
        f"{facts.preset} ({facts.backbone}, {facts.total_params / 1e9:.2f}B parameters, {facts.num_blocks} blocks), "
        f"{request.width}x{request.height}x{request.frames}: {profile.video_tokens:,} video + "
        f"{profile.text_tokens} text tokens, batch {request.batch_size}/GPU, {what}",
        f"{request.num_gpus} GPU(s) x {request.gpu_memory_gib:g} GiB "
        f"(usable {gpu_budget(request.gpu_memory_gib) / GiB:.1f}), "
        f"host RAM {request.host_ram_gib:g} GiB (usable {host_budget(request.host_ram_gib) / GiB:.1f})",
        f"activations (measured): {profile.per_token_per_block() / 1024:.1f} KiB per token per block without "
        f"checkpointing, {boundary_per_token / 1024:.1f} KiB per token per block of checkpointed block inputs",
        "",
    ]
    lines.append(f"settings are shown as overrides of the defaults ({DEFAULT_SETTING_NOTE}); [name]: accelerate config")
    header = ("setting overrides", "peak GPU GiB", "host RAM GiB", "step s", "fits?")
    rows = [
        (" ".join(e.setting.changed_overrides()) or "(defaults)", f"{e.gpu_peak / GiB:.1f}", f"{e.host_peak / GiB:.1f}",
         f"{e.step_seconds:.1f}", e.verdict())
        for e in result.estimates
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        cells = [str(c).ljust(w) if i in (0, 4) else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append(" | ".join(cells).rstrip())
    lines.append("")
    pick = result.pick
    if pick is None:
        lines.append(result.why_nothing_fits())
    else:
        lines += _render_pick(request, pick)
    lines += ["", *("note: " + n for n in result.notes)]
    return "\n".join(lines) + "\n"


def _render_pick(request: PlanRequest, pick: Estimate) -> list[str]:
    mode = [f"trainer.mode=lora lora.rank={request.lora_rank}"] if request.mode == "lora" else ["trainer.mode=full"]
    launch = ""
    if pick.setting.accelerate_config:
        launch = f"accelerate launch --config_file {pick.setting.accelerate_file()} --num_processes {request.num_gpus} "
    gib = lambda terms: ", ".join(f"{k} {v / GiB:.1f}" for k, v in terms.items())  # noqa: E731
    return [
        f"pick: the fastest setting that fits: {pick.gpu_peak / GiB:.1f} GiB GPU, "
        f"{pick.host_peak / GiB:.1f} GiB host RAM, ~{pick.step_seconds:.1f} s/step",
        f"  {launch}train.py " + " ".join(mode + pick.setting.overrides()),
        f"  GPU at its peak ({pick.gpu_peak_moment}), GiB: {gib(pick.gpu_terms)}",
        f"  host RAM at its peak ({pick.host_peak_moment}), GiB: {gib(pick.host_terms)}",
        "  step time, s: " + ", ".join(f"{k} {v:.2f}" for k, v in pick.time_terms.items()),
    ]


def plan_to_dict(result: Plan) -> dict:
    def estimate_dict(e: Estimate) -> dict:
        return {
            "overrides": e.setting.overrides(),
            "accelerate_config": e.setting.accelerate_file(),
            "gpu_peak_gib": e.gpu_peak / GiB,
            "gpu_peak_moment": e.gpu_peak_moment,
            "gpu_terms_gib": {k: v / GiB for k, v in e.gpu_terms.items()},
            "host_peak_gib": e.host_peak / GiB,
            "host_peak_moment": e.host_peak_moment,
            "host_terms_gib": {k: v / GiB for k, v in e.host_terms.items()},
            "step_seconds": e.step_seconds,
            "time_terms_s": e.time_terms,
            "fits": e.fits,
            "verdict": e.verdict(),
        }

    return {
        "request": asdict(result.request),
        "model": {**asdict(result.facts), "block_bytes": None, "num_blocks": result.facts.num_blocks},
        "activations": {**asdict(result.profile), "bytes_per_token_per_block": result.profile.per_token_per_block()},
        "gpu_budget_gib": gpu_budget(result.request.gpu_memory_gib) / GiB,
        "host_budget_gib": host_budget(result.request.host_ram_gib) / GiB,
        "candidates": [estimate_dict(e) for e in result.estimates],
        "pick": estimate_dict(result.pick) if result.pick else None,
        "why_nothing_fits": None if result.pick else result.why_nothing_fits(),
        "notes": result.notes,
        "assumptions": {
            "cuda_context_gib": CUDA_CONTEXT_BYTES / GiB,
            "gpu_margin": [GPU_MARGIN_FRACTION, GPU_MARGIN_MIN_BYTES / GiB],
            "host_margin": HOST_MARGIN_FRACTION,
            "host_process_gib": HOST_PROCESS_BYTES / GiB,
            "achieved_tflops": result.request.tflops,
            "pcie_gbps": result.request.pcie_gbps,
            "interconnect_gbps": INTERCONNECT_BYTES_PER_S / 1e9,
            "cpu_adam_params_per_s": CPU_ADAM_PARAMS_PER_S,
            "dequant_slowdown": DEQUANT_SLOWDOWN,
            "backward_transient_copies": BACKWARD_TRANSIENT_COPIES,
        },
    }
