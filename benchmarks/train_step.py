"""Training-step benchmark: the toolkit's step vs. the step a user would hand-write with diffusers + peft.

    python benchmarks/train_step.py --preset 8b --size 720x480x121 --mode lora --steps 5 --warmup 2 --json out.json
    python benchmarks/train_step.py --preset tiny --size 144x96x17 --steps 2 --warmup 1 --device cpu --json out.json

(a) toolkit: a random transformer of the preset, `make_trainable` as train.py calls it (fp32 LoRA over a frozen
    compute-dtype base), fused projections (models/fused_linear.py), gradient checkpointing, AdamW from
    `build_optimizer`, the toolkit's `batch_loss`.
(b) baseline: the same random weights, a plain peft LoRA (same rank, alpha, targets), one matmul per layer and
    per LoRA branch, gradient checkpointing, fp32 adapters, torch.autocast(bf16) on CUDA (fp32 on CPU), inline
    MSE flow-matching loss, torch AdamW.

Reports the measured matmul peak, median step times, tokens/s, model FLOPs and MFU, peak memory, the
baseline/toolkit time ratio and a numerics check (`numerics_check`, also used by the unit tests).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import peft
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from happyhorse_train.memory.offload import BlockSwap, repeated_blocks  # noqa: E402
from happyhorse_train.memory.quantize import (  # noqa: E402
    BASE_WEIGHT_FORMATS,
    mark_quantized,
    quantizable_linear_names,
    quantize_linear,
)
from happyhorse_train.memory.recompute import checkpointing_function, compile_blocks  # noqa: E402
from happyhorse_train.memory.streamed_load import peak_host_ram_bytes  # noqa: E402
from happyhorse_train.models import attention as attention_hook  # noqa: E402
from happyhorse_train.models.backbones import get_spec  # noqa: E402
from happyhorse_train.models.fused_linear import unfused_linears  # noqa: E402
from happyhorse_train.models.presets import CONFIG_DIR, load_preset  # noqa: E402
from happyhorse_train.planner import latent_shape, parse_size  # noqa: E402  (the planner's, checked)
from happyhorse_train.training.adapters import lora_target_modules, make_trainable, trainable_parameters  # noqa: E402
from happyhorse_train.training.optim import build_optimizer  # noqa: E402
from happyhorse_train.training.step import StepContext, batch_loss, sample_generator  # noqa: E402

# --- setup --------------------------------------------------------------------------------------------------

def vae_config(preset: dict) -> SimpleNamespace:
    """The VAE config fields normalize_latents reads: the preset's, else AutoencoderKLWan's defaults (tiny's
    random VAE is built with mean 0 / std 1, as demo/random_model.py does)."""
    from diffusers import AutoencoderKLWan

    vae = preset.get("vae", {})
    z_dim = vae.get("z_dim", 16)
    if preset.get("preset") == "tiny" or "base_dim" in vae:
        mean, std = [0.0] * z_dim, [1.0] * z_dim
    else:
        params = inspect.signature(AutoencoderKLWan.__init__).parameters
        mean = vae.get("latents_mean", params["latents_mean"].default)
        std = vae.get("latents_std", params["latents_std"].default)
    return SimpleNamespace(latents_mean=list(mean), latents_std=list(std))


def train_cfg(mode: str, rank: int, caption_dropout: float) -> SimpleNamespace:
    """The parts of the training config batch_loss, make_trainable and build_optimizer read (defaults)."""
    flow = OmegaConf.load(CONFIG_DIR / "flow" / "default.yaml")
    lora = OmegaConf.load(CONFIG_DIR / "lora" / "default.yaml")
    lora.rank = rank
    optimizer = OmegaConf.load(CONFIG_DIR / "optimizer" / "adamw.yaml")
    return SimpleNamespace(flow=flow, lora=lora, optimizer=optimizer, mode=mode,
                           data=SimpleNamespace(caption_dropout=caption_dropout))


def build_transformer(preset: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """A random transformer of the preset, built on `device`; the same seed gives the same weights."""
    spec = get_spec(preset["backbone"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = spec.transformer_class(**preset["transformer"])
    return model if model.dtype == dtype else model.to(dtype)


def compute_dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


MEMORY_DEFAULTS = OmegaConf.load(CONFIG_DIR / "memory" / "default.yaml")


def setup_toolkit(preset, mode, rank, device, seed=0, caption_dropout=0.1, memory=None, compile=False):
    """The toolkit's trainable model as train.py sets it up; returns (model, params, optimizer, spec, pipe, cfg).

    `memory` (the memory config group's fields) and `compile` (trainer.compile) apply those settings as
    train.py does; quantization here converts the built layers in place (train.py streams them from the
    model folder)."""
    spec = get_spec(preset["backbone"])
    compute = compute_dtype_for(device)
    cfg = train_cfg(mode, rank, caption_dropout)
    memory = memory or SimpleNamespace(**MEMORY_DEFAULTS)
    cfg.memory, cfg.trainer = memory, SimpleNamespace(compile=compile)
    model = build_transformer(preset, device, compute if mode == "lora" else torch.float32, seed)
    if memory.base_weights != "bf16":
        for name in quantizable_linear_names(model):
            parent, _, child = name.rpartition(".")
            linear = model.get_submodule(name)
            model.get_submodule(parent).register_module(child, quantize_linear(linear, memory.base_weights, compute))
        mark_quantized(model, memory.base_weights)
    torch.manual_seed(seed)
    make_trainable(model, mode, cfg.lora, spec, compute)
    model.enable_gradient_checkpointing(checkpointing_function(model, cfg))
    if compile:
        compile_blocks(model)
    model.train()
    if memory.blocks_to_swap:
        model._block_swap = BlockSwap(repeated_blocks(model), memory.blocks_to_swap, device)
    params = list(trainable_parameters(model).values())
    optimizer = build_optimizer(params, cfg.optimizer)
    pipe = SimpleNamespace(transformer=model, vae=SimpleNamespace(config=vae_config(preset)))
    return model, params, optimizer, spec, pipe, cfg


def setup_baseline(preset, mode, rank, device, seed=0):
    """What a user hand-writes: the same random weights, plain peft LoRA, checkpointing, fp32 adapters."""
    spec = get_spec(preset["backbone"])
    compute = compute_dtype_for(device)
    lora = OmegaConf.load(CONFIG_DIR / "lora" / "default.yaml")
    model = build_transformer(preset, device, compute if mode == "lora" else torch.float32, seed)
    if mode == "lora":
        model.requires_grad_(False)
        config = peft.LoraConfig(r=rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora_target_modules(lora, spec, model))  # the trainer's choice
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, model)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
                param.requires_grad_(True)
    else:
        model.requires_grad_(True)
    model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    return model, params, optimizer


def plain_sdpa(query, key, value, attn_mask):
    """Attention as a user writes it: one SDPA call, torch's default kernel choice."""
    gqa = key.shape[1] != query.shape[1]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, enable_gqa=gqa)


attention_hook.register_attention_backend("benchmark-plain-sdpa", plain_sdpa)


@contextlib.contextmanager
def baseline_kernels():
    """The baseline's model runs plain SDPA and one matmul per linear layer; the toolkit's runs its own attention
    kernel choice (models/attention.py) and fuses the layers that read the same input (models/fused_linear.py)."""
    with attention_hook.using_attention_backend("benchmark-plain-sdpa"), unfused_linears():
        yield


def synthetic_batch(shape, text_tokens, text_dim, batch_size, seed=0):
    """A host batch, as the trainer's loader yields it: both steps move it to the device themselves."""
    g = torch.Generator().manual_seed(seed)
    b = batch_size
    return {
        "latent_mean": torch.randn(b, *shape, generator=g),
        "latent_std": 0.05 * torch.rand(b, *shape, generator=g),
        "text_states": torch.randn(b, text_tokens, text_dim, generator=g),
        "text_mask": torch.ones(b, text_tokens, dtype=torch.bool),
    }


# --- one step each ------------------------------------------------------------------------------------------

def toolkit_loss(model, spec, pipe, cfg, batch, generators, device):
    empty_text = torch.zeros(1, batch["text_states"].shape[-1])
    context = StepContext(spec, pipe, model, device, compute_dtype_for(device), cfg.flow, cfg.data.caption_dropout,
                          empty_text)
    return batch_loss(batch, generators, context)


def baseline_loss(model, x0, noise, sigma, text, device):
    """The textbook rectified-flow loss, written inline."""
    text = text.to(device)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = model(x_t, text, sigma * 1000, return_dict=False)[0]
    return F.mse_loss(pred.float(), (noise - x0).float())


def baseline_inputs(batch, vae_cfg, seeds_or_none, device, flow=None):
    """x0 (normalized), noise, sigma: from per-sample generators drawn in the toolkit's order when seeds are
    given (the numerics check, on the host as the toolkit draws), else from the global RNG on the device (the
    benchmark)."""
    mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
    c = mean.shape[1]
    vmean = torch.tensor(vae_cfg.latents_mean, device=device).view(1, c, 1, 1, 1)
    vstd = torch.tensor(vae_cfg.latents_std, device=device).view(1, c, 1, 1, 1)
    if seeds_or_none is None:
        posterior, noise = torch.randn_like(mean), torch.randn_like(mean)
        sigma = torch.sigmoid(torch.randn(mean.shape[0], device=device))
    else:
        posterior, sigma, noise = [], [], []
        for g in seeds_or_none:
            posterior.append(torch.randn(mean.shape[1:], generator=g))
            sigma.append(torch.sigmoid(flow.logit_mean + flow.logit_std * torch.randn(1, generator=g))[0])
            noise.append(torch.randn(mean.shape[1:], generator=g))
        posterior, sigma, noise = (torch.stack(x).to(device) for x in (posterior, sigma, noise))
    x0 = (mean + std * posterior - vmean) / vstd
    return x0, noise, sigma


# --- numerics -----------------------------------------------------------------------------------------------

def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def numerics_check(preset="tiny", size=(144, 96, 17), mode="lora", rank=32, device="cpu", text_tokens=32,
                   seed=0, batch_size=1, memory=None, compile=False) -> dict:
    """Same weights, same (x0, noise, sigma, text): the toolkit's loss and trained-parameter gradients vs. the
    hand-written baseline's. Returns loss values, the relative loss difference and the largest per-tensor
    relative gradient difference (max |g_tk - g_bl| / max |g_bl|). `memory` and `compile`: the toolkit's
    settings, as in setup_toolkit."""
    preset = load_preset(preset) if isinstance(preset, str) else preset
    device = torch.device(device)
    shape = latent_shape(preset, *size)
    tk, tk_params, _, spec, pipe, cfg = setup_toolkit(preset, mode, rank, device, seed, caption_dropout=0.0,
                                                      memory=memory, compile=compile)
    bl, _, _ = setup_baseline(preset, mode, rank, device, seed)
    # LoRA B starts at zero, which would leave A's gradients zero: give the adapters random values, same in both.
    g = torch.Generator().manual_seed(seed + 1)
    bl_named = dict(bl.named_parameters())
    with torch.no_grad():
        for name, param in tk.named_parameters():
            if param.requires_grad:
                if mode == "lora":
                    param.copy_((0.02 * torch.randn(param.shape, generator=g)).to(param))
                bl_named[name].copy_(param)
    batch = synthetic_batch(shape, text_tokens, preset["transformer"]["text_dim"], batch_size, seed)
    seeds = [seed * 1000 + i for i in range(batch_size)]

    loss_tk = toolkit_loss(tk, spec, pipe, cfg, batch, [torch.Generator().manual_seed(s) for s in seeds], device).loss
    loss_tk.backward()
    x0, noise, sigma = baseline_inputs(batch, pipe.vae.config, [torch.Generator().manual_seed(s) for s in seeds],
                                       device, cfg.flow)
    with baseline_kernels():
        loss_bl = baseline_loss(bl, x0, noise, sigma, batch["text_states"], device)
        loss_bl.backward()

    grad_rel, worst = 0.0, None
    for name, param in tk.named_parameters():
        if param.requires_grad:
            rel = _max_rel(param.grad, bl_named[name].grad)
            if rel >= grad_rel:
                grad_rel, worst = rel, name
    result = {
        "loss_toolkit": loss_tk.item(),
        "loss_baseline": loss_bl.item(),
        "loss_rel_diff": abs(loss_tk.item() - loss_bl.item()) / max(abs(loss_bl.item()), 1e-30),
        "grad_max_rel_diff": grad_rel,
        "grad_worst_param": worst,
        "grad_tensors_compared": sum(p.requires_grad for p in tk.parameters()),
        "shape": list(shape),
        "device": device.type,
        "dtype": str(compute_dtype_for(device)),
    }
    del tk, bl, tk_params
    _free(device)
    return result


# --- measuring ----------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of the best of a few large square matmuls (bf16 8192^3 on CUDA, fp32 1024^3 on CPU)."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if device.type == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    del a, b
    return 2 * n**3 / best


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the VmHWM high-water mark
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def time_steps(step, steps, warmup, device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        step(i)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def run_toolkit(preset, args, device, shape, text_tokens) -> dict:
    _reset_peak(device)
    model, params, optimizer, spec, pipe, cfg = setup_toolkit(
        preset, args.mode, args.lora_rank, device, args.seed, memory=memory_settings(args), compile=args.compile)
    batch = synthetic_batch(shape, text_tokens, preset["transformer"]["text_dim"], args.batch_size, args.seed)

    def loss_of_step(i):
        gens = [sample_generator(args.seed, i, 0, f"clip{j}") for j in range(args.batch_size)]
        return toolkit_loss(model, spec, pipe, cfg, batch, gens, device).loss

    return _timed_training(loss_of_step, params, optimizer, args, device)


def memory_settings(args) -> SimpleNamespace:
    return SimpleNamespace(base_weights=args.base_weights, offload_activations=args.offload_activations,
                           blocks_to_swap=args.blocks_to_swap, saved_attention_blocks=args.saved_attention_blocks)


def run_baseline(preset, args, device, shape, text_tokens) -> dict:
    _reset_peak(device)
    model, params, optimizer = setup_baseline(preset, args.mode, args.lora_rank, device, args.seed)
    batch = synthetic_batch(shape, text_tokens, preset["transformer"]["text_dim"], args.batch_size, args.seed)
    vae_cfg = vae_config(preset)

    def loss_of_step(i):
        x0, noise, sigma = baseline_inputs(batch, vae_cfg, None, device)
        return baseline_loss(model, x0, noise, sigma, batch["text_states"], device)

    with baseline_kernels():
        return _timed_training(loss_of_step, params, optimizer, args, device)


def _timed_training(loss_of_step, params, optimizer, args, device) -> dict:
    """Time full steps (loss, backward, optimizer step)."""
    losses = []

    def step(i):
        loss = loss_of_step(i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    times = time_steps(step, args.steps, args.warmup, device)
    out = {"step_times_s": times, "trainable_params": sum(p.numel() for p in params),
           "peak_memory_bytes": _peak_bytes(device), "last_loss": losses[-1].item()}
    return out


def count_base_params(preset) -> int:
    """Parameters of the transformer, without building it (meta device)."""
    spec = get_spec(preset["backbone"])
    with torch.device("meta"):
        model = spec.transformer_class(**preset["transformer"])
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", default=None, help="WxHxF, e.g. 720x480x121 (default: the preset's sample size)")
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=None, help="default: 32 for tiny, 512 otherwise")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--numerics-size", default=None, help="WxHxF for the numerics check (default: --size)")
    parser.add_argument("--skip-numerics", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--base-weights", default="bf16", choices=BASE_WEIGHT_FORMATS,
                        help="toolkit side: frozen base format (memory.base_weights)")
    parser.add_argument("--offload-activations", action="store_true", help="toolkit side: memory.offload_activations")
    parser.add_argument("--blocks-to-swap", type=int, default=0, help="toolkit side: memory.blocks_to_swap")
    parser.add_argument("--saved-attention-blocks", type=int, default=0,
                        help="toolkit side: memory.saved_attention_blocks")
    parser.add_argument("--compile", action="store_true", help="toolkit side: trainer.compile (the warm-up steps "
                        "pay the compile; give --warmup 2 or more)")
    parser.add_argument("--gpu-memory-cap", type=float, default=None,
                        help="GiB: cap the toolkit run with torch.cuda.set_per_process_memory_fraction (the baseline "
                             "runs first, uncapped)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    preset = load_preset(args.preset)
    with torch.device("meta"):
        meta_transformer = get_spec(preset["backbone"]).transformer_class(**preset["transformer"])
    if get_spec(preset["backbone"]).image_conditioning(meta_transformer):
        raise SystemExit(f"error: {args.preset} is image to video; this benchmark times text-to-video steps")
    sample = preset.get("sample", {})
    size = parse_size(args.size) if args.size else (sample["width"], sample["height"], sample["num_frames"])
    shape = latent_shape(preset, *size)
    tcfg = preset["transformer"]
    text_tokens = args.text_tokens or (32 if preset.get("preset") == "tiny" else 512)
    pt, ph, pw = tcfg.get("patch_size", [1, 2, 2])
    video_tokens = (shape[1] // pt) * (shape[2] // ph) * (shape[3] // pw)
    T = text_tokens + video_tokens
    L = tcfg["num_layers"]
    d = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    n_params = count_base_params(preset)
    flops = args.batch_size * ((4 if args.mode == "lora" else 6) * n_params * T + 12 * L * d * T**2)

    peak = matmul_peak(device)
    baseline = run_baseline(preset, args, device, shape, text_tokens)
    _free(device)  # the baseline's model went with run_baseline's frame
    if args.gpu_memory_cap and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_cap * 2**30 / total), device)
    toolkit = run_toolkit(preset, args, device, shape, text_tokens)
    _free(device)
    for r in (toolkit, baseline):
        r["median_step_s"] = statistics.median(r["step_times_s"])
        r["video_tokens_per_s"] = args.batch_size * video_tokens / r["median_step_s"]
        r["tokens_per_s"] = args.batch_size * T / r["median_step_s"]
        r["mfu"] = flops / r["median_step_s"] / peak
        r["peak_memory_gib"] = r["peak_memory_bytes"] / 2**30
    numerics = None
    if not args.skip_numerics:
        nsize = parse_size(args.numerics_size) if args.numerics_size else size
        numerics = numerics_check(preset, nsize, args.mode, args.lora_rank, device, text_tokens, args.seed,
                                  args.batch_size, memory_settings(args), args.compile)

    result = {
        "preset": args.preset, "size": "x".join(map(str, size)), "latent_shape": list(shape), "mode": args.mode,
        "lora_rank": args.lora_rank, "batch_size": args.batch_size, "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "compute_dtype": str(compute_dtype_for(device)), "torch_threads": torch.get_num_threads(),
        "text_tokens": text_tokens, "video_tokens": video_tokens, "total_tokens": T,
        "base_params": n_params, "num_layers": L, "hidden_size": d,
        "flops_per_step": flops, "matmul_peak_flops": peak,
        "floor_step_s": flops / peak,
        "steps": args.steps, "warmup": args.warmup,
        "toolkit": toolkit, "baseline": baseline,
        "toolkit_settings": {**vars(memory_settings(args)), "compile": args.compile,
                             "gpu_memory_cap_gib": args.gpu_memory_cap},
        "peak_host_ram_gib": peak_host_ram_bytes() / 2**30,
        "ratio_baseline_over_toolkit": baseline["median_step_s"] / toolkit["median_step_s"],
        "numerics": numerics,
    }
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def print_table(r: dict) -> None:
    mem = "GPU max allocated" if r["device"] == "cuda" else "host peak RSS (VmHWM)"
    print(f"\npreset {r['preset']}  {r['size']} -> latent {tuple(r['latent_shape'])}  mode {r['mode']}"
          f" (rank {r['lora_rank']})  batch {r['batch_size']}  {r['device_name']} {r['compute_dtype']}")
    print(f"tokens {r['total_tokens']:,} ({r['text_tokens']} text + {r['video_tokens']:,} video)  "
          f"params {r['base_params']:,}  L={r['num_layers']} d={r['hidden_size']}")
    print(f"FLOPs/step {r['flops_per_step']:.3e}  measured matmul peak {r['matmul_peak_flops'] / 1e12:.3f} TFLOP/s"
          f"  floor {r['floor_step_s'] * 1e3:.2f} ms")
    print(f"\n| {'step':<9} | {'median s':>10} | {'min s':>10} | {'tok/s':>12} | {'MFU':>7} | {'peak GiB':>9} "
          f"| {'trainable':>12} |")
    print(f"|{'-' * 11}|{'-' * 12}|{'-' * 12}|{'-' * 14}|{'-' * 9}|{'-' * 11}|{'-' * 14}|")
    for name in ("toolkit", "baseline"):
        x = r[name]
        print(f"| {name:<9} | {x['median_step_s']:>10.4f} | {min(x['step_times_s']):>10.4f} "
              f"| {x['tokens_per_s']:>12,.0f}"
              f" | {x['mfu'] * 100:>6.2f}% | {x['peak_memory_gib']:>9.3f} | {x['trainable_params']:>12,} |")
    print(f"\nbaseline / toolkit step time: {r['ratio_baseline_over_toolkit']:.3f}   (peak memory: {mem})")
    n = r["numerics"]
    if n:
        print(f"numerics ({n['device']} {n['dtype']}, latent {tuple(n['shape'])}): loss toolkit {n['loss_toolkit']:.6f}"
              f" baseline {n['loss_baseline']:.6f}  rel diff {n['loss_rel_diff']:.2e}; "
              f"grads max rel diff {n['grad_max_rel_diff']:.2e} over {n['grad_tensors_compared']} tensors")


if __name__ == "__main__":
    main()
