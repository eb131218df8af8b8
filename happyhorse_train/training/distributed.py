"""What the loop must do differently under each way accelerate can spread a run over processes.

Plain runs and DDP keep the whole model and optimizer in every process; the loop clips, checks and steps
itself. Under DeepSpeed ZeRO the engine shards optimizer states (stage 2) and parameters too (stage 3), and
it clips and steps inside `accelerator.backward`. The launcher's config file (configs/accelerate/) chooses;
this module only adapts to the choice.
"""

from __future__ import annotations

import contextlib

from accelerate.utils import DistributedType

from happyhorse_train.errors import RunHalted, UserInputError


class Replicated:
    """Single process or DDP: the loop sees the gradients before the optimizer steps."""

    def check_supported(self, cfg) -> None:
        pass

    def loading(self):
        """Around loading the pipeline."""
        return contextlib.nullcontext()

    def configure(self, cfg) -> None:
        pass

    def check_nonfinite_recoverable(self, step: int) -> None:
        """Nothing was applied yet: the loop skips the step."""


class DeepSpeedZero(Replicated):
    def __init__(self, accelerator):
        self.plugin = accelerator.state.deepspeed_plugin
        self.zero_stage = int(self.plugin.zero_stage)

    def check_supported(self, cfg) -> None:
        problems = []
        if self.zero_stage == 3 and cfg.trainer.ema:
            problems.append("trainer.ema=true: EMA needs whole weights in every process, ZeRO-3 shards them")
        if self.zero_stage == 3 and cfg.validation.every and cfg.validation.prompts:
            problems.append(
                "validation.every: rendering needs whole weights, ZeRO-3 shards them; set validation.every=0 and "
                "render from the saved LoRA with sample.py"
            )
        if cfg.memory.base_weights != "bf16":
            problems.append(
                f"memory.base_weights={cfg.memory.base_weights}: quantized base weights save memory on one GPU; "
                "under DeepSpeed use bf16 and let ZeRO-3 shard them"
            )
        if cfg.memory.offload_activations:
            problems.append("memory.offload_activations: untested under DeepSpeed's parameter hooks; ZeRO shards instead")
        if cfg.trainer.compile:
            problems.append("trainer.compile: untested with DeepSpeed's parameter hooks")
        if cfg.memory.saved_attention_blocks:
            problems.append("memory.saved_attention_blocks: untested with DeepSpeed's parameter hooks")
        if cfg.memory.blocks_to_swap:
            problems.append("memory.blocks_to_swap: block swap is for one GPU; ZeRO-3 (with offload) shards instead")
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


def distributed_strategy(accelerator) -> Replicated:
    return DeepSpeedZero(accelerator) if is_deepspeed(accelerator) else Replicated()


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED
