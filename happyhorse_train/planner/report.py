"""The plan as text (the table, the pick and its breakdown) or as a JSON-ready dict."""

from __future__ import annotations

from dataclasses import asdict

from happyhorse_train.planner.assumptions import (
    BACKWARD_TRANSIENT_COPIES,
    CPU_ADAM_PARAMS_PER_S,
    CUDA_CONTEXT_BYTES,
    DEFAULT_SETTING_NOTE,
    DEQUANT_SLOWDOWN,
    GPU_MARGIN_FRACTION,
    GPU_MARGIN_MIN_BYTES,
    HOST_MARGIN_FRACTION,
    HOST_PROCESS_BYTES,
    INTERCONNECT_BYTES_PER_S,
    GiB,
)
from happyhorse_train.planner.estimates import Estimate, Plan, gpu_budget, host_budget
from happyhorse_train.planner.request import PlanRequest


def render_plan(result: Plan) -> str:
    request, facts, profile = result.request, result.facts, result.profile
    boundary_per_token = profile.boundary_per_block() / (profile.batch_size * profile.sequence_tokens)
    lora = f"LoRA r={request.lora_rank} ({facts.lora_params / 1e6:.1f}M trained)"
    what = lora if request.mode == "lora" else "full fine-tune"
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
        f"settings are shown as overrides of the defaults ({DEFAULT_SETTING_NOTE}); [name]: accelerate config",
    ]
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
    lines += ["", result.why_nothing_fits()] if result.pick is None else ["", *_render_pick(request, result.pick)]
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
