"""Inference benchmark: one transformer forward, and one guided denoising step, toolkit vs hand-written.

    python benchmarks/inference_forward.py --preset 8b --size 720x480x121 --compile --json out.json
    python benchmarks/inference_forward.py --preset tiny --size 144x96x17 --device cpu

(a) toolkit: the forward as validation and sample.py run it: the pipeline's attention kernel choice
    (models/attention.py), linear layers reading the same input fused (models/fused_linear.py), blocks compiled
    with --compile (trainer.compile), classifier-free guidance as one batch of two (HappyHorsePipeline), the
    unconditional prompt padded and masked.
(b) baseline: the same weights, plain SDPA with torch's default kernel choice, one matmul per linear layer, no
    compile, guidance as two forwards (conditional, then unconditional), as diffusers' Wan pipeline runs it.

Prints median seconds of one batch-1 forward and of one guided step for each, their ratios, and the largest
difference between the two sides' outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import (  # noqa: E402  (the training benchmark's setup and measuring helpers)
    _free,
    _peak_bytes,
    _reset_peak,
    baseline_kernels,
    build_transformer,
    compute_dtype_for,
    latent_shape,
    load_preset,
    parse_size,
    time_steps,
)

from happyhorse_train.memory.recompute import compile_blocks  # noqa: E402


def inputs(preset, shape, text_tokens, uncond_tokens, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    text_dim = preset["transformer"]["text_dim"]
    latents = torch.randn(1, *shape, generator=g).to(device, dtype)
    cond = torch.randn(1, text_tokens, text_dim, generator=g).to(device, dtype)
    uncond = torch.zeros(1, text_tokens, text_dim, dtype=dtype, device=device)
    uncond[:, :uncond_tokens] = torch.randn(1, uncond_tokens, text_dim, generator=g).to(device, dtype)
    uncond_mask = torch.zeros(1, text_tokens, dtype=torch.bool, device=device)
    uncond_mask[:, :uncond_tokens] = True
    timestep = torch.tensor([500.0], device=device)
    return latents, cond, uncond, uncond_mask, timestep


def measure(run, steps, warmup, device) -> dict:
    _reset_peak(device)
    outputs = []
    times = time_steps(lambda i: outputs.append(run()), steps, warmup, device)
    return {"times_s": times, "median_s": statistics.median(times), "peak_memory_gib": _peak_bytes(device) / 2**30,
            "output": outputs[-1]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", default=None, help="WxHxF (default: the preset's sample size)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=None, help="prompt tokens (default 32 tiny, 128 otherwise)")
    parser.add_argument("--uncond-tokens", type=int, default=2, help="tokens of the empty negative prompt")
    parser.add_argument("--compile", action="store_true", help="toolkit side: compile the blocks (trainer.compile)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = compute_dtype_for(device)
    preset = load_preset(args.preset)
    sample = preset.get("sample", {})
    size = parse_size(args.size) if args.size else (sample["width"], sample["height"], sample["num_frames"])
    shape = latent_shape(preset, *size)
    text_tokens = args.text_tokens or (32 if preset.get("preset") == "tiny" else 128)
    latents, cond, uncond, uncond_mask, t = inputs(preset, shape, text_tokens, args.uncond_tokens, device, dtype)
    model = build_transformer(preset, device, dtype, seed=0).eval().requires_grad_(False)

    def forward(x, text, mask, timestep):
        with torch.no_grad():
            return model(x, text, timestep, encoder_attention_mask=mask, return_dict=False)[0]

    def baseline_guided():
        return torch.cat([forward(latents, cond, None, t), forward(latents, uncond, uncond_mask, t)])

    cond_mask = torch.ones_like(uncond_mask)
    both_text, both_mask = torch.cat([cond, uncond]), torch.cat([cond_mask, uncond_mask])

    def toolkit_guided():
        return forward(torch.cat([latents, latents]), both_text, both_mask, t.expand(2))

    results = {}
    with baseline_kernels():
        results["baseline_forward"] = measure(lambda: forward(latents, cond, None, t), args.steps, args.warmup, device)
        results["baseline_guided_step"] = measure(baseline_guided, args.steps, args.warmup, device)
    if args.compile:
        compile_blocks(model)
    results["toolkit_forward"] = measure(lambda: forward(latents, cond, None, t), args.steps, args.warmup, device)
    results["toolkit_guided_step"] = measure(toolkit_guided, args.steps, args.warmup, device)

    def max_rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    out = {
        "preset": args.preset, "size": "x".join(map(str, size)), "latent_shape": list(shape),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
        "text_tokens": text_tokens, "uncond_tokens": args.uncond_tokens, "compile": args.compile,
        **{name: {k: v for k, v in r.items() if k != "output"} for name, r in results.items()},
        "forward_ratio_baseline_over_toolkit":
            results["baseline_forward"]["median_s"] / results["toolkit_forward"]["median_s"],
        "guided_ratio_baseline_over_toolkit":
            results["baseline_guided_step"]["median_s"] / results["toolkit_guided_step"]["median_s"],
        "forward_output_max_rel_diff":
            max_rel(results["toolkit_forward"]["output"], results["baseline_forward"]["output"]),
        "guided_output_max_rel_diff":
            max_rel(results["toolkit_guided_step"]["output"], results["baseline_guided_step"]["output"]),
    }
    print(f"\npreset {out['preset']}  {out['size']} -> latent {tuple(shape)}  {out['device_name']} {out['dtype']}"
          f"  compile {args.compile}")
    print(f"| {'what':<22} | {'median s':>10} | {'peak GiB':>9} |")
    print(f"|{'-' * 24}|{'-' * 12}|{'-' * 11}|")
    for name in ("toolkit_forward", "baseline_forward", "toolkit_guided_step", "baseline_guided_step"):
        print(f"| {name:<22} | {out[name]['median_s']:>10.4f} | {out[name]['peak_memory_gib']:>9.3f} |")
    print(f"\nbaseline / toolkit: one forward {out['forward_ratio_baseline_over_toolkit']:.3f}, guided step "
          f"{out['guided_ratio_baseline_over_toolkit']:.3f}; outputs max rel diff: forward "
          f"{out['forward_output_max_rel_diff']:.2e}, guided {out['guided_output_max_rel_diff']:.2e}")
    _free(device)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
