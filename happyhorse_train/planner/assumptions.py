"""The planner's named constants: each stands in for a measurement we do not have yet."""

from __future__ import annotations

import torch

from happyhorse_train.memory.quantize import BASE_WEIGHT_FORMATS as BASE_FORMATS  # noqa: F401  (one list)
from happyhorse_train.memory.quantize import FP8_BLOCK_SIZE as FP8_SCALE_BLOCK  # noqa: F401  (one tile size)

GiB = 2**30

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
# bf16 FLOP/s a training step achieves. Calibrated on docs/benchmarks.md's reference figures: the hand-written
# LoRA step for an 8.2B DiT at 41,850 tokens does 6.2e15 FLOPs (6NT-style count with recompute) in 14.1 s on
# an H200.
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

OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2}  # per trainable parameter: two fp32 / two 8-bit moments
# The optimizer step's temporaries per trainable parameter. training/optim.py builds torch's fused AdamW, which
# updates in place: measured on the CPU, one step over 1 GiB of fp32 parameters raised the peak by 64 KiB
# (foreach AdamW, which builds sqrt(v) for all parameters at once: by 1 GiB, one fp32 copy).
OPTIMIZER_STEP_TEMP_BYTES = {"adamw": 0, "adamw8bit": 0}
# configs/accelerate/ files the planner weighs for several GPUs
ACCELERATE_CONFIGS = ("multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp")
# Preset VAEs that leave their config to the model folder: latent channels -> (spatial, temporal) compression.
VAE_FACTORS_BY_LATENT_CHANNELS = {16: (8, 4), 48: (16, 4)}  # Wan 2.1 VAE, Wan 2.2 VAE

DEFAULT_SETTING_NOTE = "bf16 base, gradient checkpointing on, no activation offload, no block swap, adamw"
