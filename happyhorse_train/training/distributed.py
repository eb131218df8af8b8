"""What the loop must do differently under each way accelerate can spread a run over processes.

Plain runs and DDP keep the whole model and optimizer in every process; the loop clips, checks and steps
itself. Under DeepSpeed ZeRO the engine shards optimizer states (stage 2) and parameters too (stage 3), and
it clips and steps inside `accelerator.backward`. The launcher's config file (configs/accelerate/) chooses;
this module only adapts to the choice.
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate.utils import DistributedType

from happyhorse_train.config import validation_on
from happyhorse_train.errors import RunHalted, UserInputError


class Replicated:
    """Single process or DDP: the loop sees the gradients before the optimizer steps."""

    name = "neither DeepSpeed nor FSDP"  # what checkpoints say wrote them

    def check_supported(self, cfg) -> None:
        pass

    def loading(self):
        """Around loading the pipeline."""
        return contextlib.nullcontext()

    def configure(self, cfg) -> None:
        pass

    def check_nonfinite_recoverable(self, step: int) -> None:
        """Nothing was applied yet: the loop skips the step."""

    def gathered_weights(self, accelerator, model) -> dict:
        """The trained model's whole state dict on the main process (every process must call this)."""
        return accelerator.get_state_dict(model)


def _needs_whole_weights(cfg, engine: str) -> list[str]:
    problems = []
    if cfg.trainer.ema:
        problems.append(f"trainer.ema=true: EMA needs whole weights in every process, {engine} shards them")
    if validation_on(cfg):
        problems.append(
            f"validation.every: rendering needs whole weights, {engine} shards them; set validation.every=0 and "
            "render from the saved LoRA with sample.py"
        )
    return problems


def _single_gpu_memory_settings(cfg, engine: str) -> list[str]:
    """The memory settings made for one GPU: a sharding engine shards instead, and its parameter hooks are
    untested with theirs."""
    problems = []
    if cfg.memory.base_weights != "bf16":
        problems.append(
            f"memory.base_weights={cfg.memory.base_weights}: quantized base weights save memory on one GPU; "
            f"under {engine} use bf16 and let it shard them"
        )
    if cfg.memory.offload_activations:
        problems.append(f"memory.offload_activations: untested with {engine}'s parameter hooks; it shards instead")
    if cfg.trainer.compile:
        problems.append(f"trainer.compile: untested with {engine}'s parameter hooks")
    if cfg.memory.blocks_to_swap:
        problems.append(f"memory.blocks_to_swap: block swap is for one GPU; {engine} shards instead")
    return problems


class DeepSpeedZero(Replicated):
    name = "DeepSpeed"

    def __init__(self, accelerator):
        self.plugin = accelerator.state.deepspeed_plugin
        self.zero_stage = int(self.plugin.zero_stage)

    def check_supported(self, cfg) -> None:
        problems = _needs_whole_weights(cfg, "ZeRO-3") if self.zero_stage == 3 else []
        problems += _single_gpu_memory_settings(cfg, self.name)
        if cfg.memory.saved_attention_blocks:
            problems.append("memory.saved_attention_blocks: untested with DeepSpeed's parameter hooks")
        if problems:
            raise UserInputError(f"not supported with DeepSpeed ZeRO-{self.zero_stage}:\n  " + "\n  ".join(problems))

    @contextlib.contextmanager
    def loading(self):
        # accelerate registers its DeepSpeed config with transformers, which then partitions models as they
        # load under ZeRO-3 (zero.Init), whatever zero3_init_flag says. The text encoder runs outside the
        # DeepSpeed engine and must load whole; the transformer is sharded later, by `prepare`.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.plugin.set_deepspeed_weakref()

    def configure(self, cfg) -> None:
        """Fill in what DeepSpeed needs from the training config (the loop's DataLoader is not prepared by
        accelerate, so DeepSpeed cannot read the batch size from it)."""
        config = self.plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        config["gradient_clipping"] = cfg.optimizer.max_grad_norm or 0.0
        # The training config's optimizer (torch AdamW or bitsandbytes AdamW8bit) also runs on offloaded
        # states; DeepSpeed would otherwise insist on its own compiled CPU Adam.
        config["zero_force_ds_cpu_optimizer"] = False

    def check_nonfinite_recoverable(self, step: int) -> None:
        # DeepSpeed stepped inside backward, before the loop could look at the gradients.
        raise RunHalted(
            f"a non-finite gradient reached the optimizer at step {step + 1} under DeepSpeed, which steps before "
            "the loop can skip; the weights in memory are not trustworthy. Resume from the last checkpoint with "
            "a lower optimizer.lr (resume=latest)"
        )


class FullyShardedDataParallel(Replicated):
    """FSDP2 via accelerate: `prepare` shards every repeated block and replaces the parameters with DTensors,
    so the loop re-reads its trainable parameters after `prepare`. Clipping sees the whole gradient norm (the
    DTensor norm is reduced across processes), so every process skips a non-finite step together."""

    name = "FSDP"

    def __init__(self, plugin):
        self.plugin = plugin  # accelerate's FullyShardedDataParallelPlugin

    def check_supported(self, cfg) -> None:
        problems = _needs_whole_weights(cfg, self.name)
        if self.plugin.fsdp_version != 2:
            problems.append(f"fsdp_version: {self.plugin.fsdp_version}: only FSDP2 is tested; set fsdp_version: 2 in "
                            "the accelerate config (configs/accelerate/fsdp.yaml)")
        problems += _single_gpu_memory_settings(cfg, self.name)
        if cfg.optimizer.name != "adamw":
            problems.append(f"optimizer.name={cfg.optimizer.name}: untested on FSDP's sharded parameters; use adamw")
        if problems:
            raise UserInputError("not supported with FSDP:\n  " + "\n  ".join(problems))

    def configure(self, cfg) -> None:
        # Two changes to accelerate's FSDP2 mixed precision: gradients are reduced in float32 (its default is
        # the compute dtype), as DDP does; and the forward's inputs are left as they come. FSDP would cast them
        # to the compute dtype at every sharded module, rounding the float32 timesteps (873.4 -> 872) and RoPE
        # tables that every other path keeps in float32; autocast already casts what the matmuls take.
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = self.plugin.mixed_precision_policy
        if policy is not None:
            self.plugin.mixed_precision_policy = MixedPrecisionPolicy(
                param_dtype=policy.param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
            )

    def gathered_weights(self, accelerator, model) -> dict:
        # Only what trains: for a LoRA, gathering the frozen base too would copy the whole model to process 0.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(model, options=options)


def gradient_accumulation(steps: int):
    """accelerate's accumulation over `steps` batches. By default it skips the gradient sync between them; FSDP
    would then keep whole unsharded float32 gradients on every GPU until the step, so under FSDP (which the
    launcher announces in the environment) every batch's gradients are reduce-scattered at once."""
    from accelerate.utils import GradientAccumulationPlugin

    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return GradientAccumulationPlugin(num_steps=steps, sync_each_batch=fsdp)


def distributed_strategy(accelerator) -> Replicated:
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedZero(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        return FullyShardedDataParallel(accelerator.state.fsdp_plugin)
    return Replicated()
