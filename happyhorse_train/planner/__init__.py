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
in `assumptions.py`, labelled as an assumption.

Known approximations: the meta device runs PyTorch's composite RMSNorm (it keeps float32 copies of its input),
where CUDA's fused kernel keeps less (about 12% of a block's saved bytes for the 8b preset in pure bf16);
autocast's float32 ops are not emulated; quantized layers are assumed to save what bf16 ones save; with
DeepSpeed a full fine-tune's weights are bf16, so the measured bf16 weight casts are counted in excess.

Candidate settings are described by the config overrides a user passes (`Setting.overrides`).

Modules: `assumptions` (the named constants), `request` (what the user asks, the clip size), `facts`
(meta-device parameter / LoRA / quantized byte counts), `measure` (meta-device activation measurement),
`estimates` (per-candidate peak GPU / host memory and step time, candidate generation, the plan), `report`
(the table and the JSON).
"""

from happyhorse_train.planner.estimates import Estimate, Plan, Setting, candidate_settings, plan
from happyhorse_train.planner.facts import ModelFacts, model_facts
from happyhorse_train.planner.measure import (
    ActivationProfile,
    EmulatedAutocast,
    FlashLikeAttention,
    flash_like_attention,
    measure_activations,
)
from happyhorse_train.planner.report import plan_to_dict, render_plan
from happyhorse_train.planner.request import PlanRequest, latent_shape, parse_size

__all__ = [
    "ActivationProfile", "EmulatedAutocast", "Estimate", "FlashLikeAttention", "ModelFacts", "Plan", "PlanRequest",
    "Setting", "candidate_settings", "flash_like_attention", "latent_shape", "measure_activations", "model_facts",
    "parse_size", "plan", "plan_to_dict", "render_plan",
]
