"""What the loop must do differently under each way accelerate can spread a run over processes.

Plain runs and DDP keep the whole model and optimizer in every process; the loop clips, checks and steps
itself. Under DeepSpeed ZeRO the engine shards optimizer states (stage 2) and parameters too (stage 3), and
it clips and steps inside `accelerator.backward`. The launcher's config file (configs/accelerate/) chooses;
this module only adapts to the choice.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy

from happyhorse_train.combinations import Engine, combination_problems
from happyhorse_train.errors import RunHalted, UserInputError
from happyhorse_train.training.adapters import trainable_parameters


class Replicated:
    """Single process or DDP: the loop sees the gradients before the optimizer steps."""

    name = "replicated"  # what a checkpoint records as its writer
    engine = Engine("one process or DDP")  # what it does, for the settings that work under it (combinations.py)

    def check_supported(self, cfg) -> None:
        problems = combination_problems(cfg, self.engine)
        if problems:
            raise UserInputError(f"not supported with {self.engine.label}:\n  " + "\n  ".join(problems))

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

    def save_engine_state(self, accelerator, folder: Path, model, optimizer) -> None:
        """The trained weights and optimizer state into a checkpoint `folder` (every process calls this)."""
        if accelerator.is_main_process:
            trainable = trainable_parameters(accelerator.unwrap_model(model))
            tensors = {name: param.detach().contiguous().cpu() for name, param in trainable.items()}
            save_file(tensors, str(folder / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def load_engine_state(self, accelerator, folder: Path, model, optimizer) -> None:
        _load_trainable(folder, accelerator.unwrap_model(model))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False))


def _load_trainable(folder: Path, model: torch.nn.Module) -> None:
    saved = load_file(str(folder / "trainable.safetensors"))
    params = dict(model.named_parameters())
    trained_here = {name for name, param in params.items() if param.requires_grad}
    reshaped = sorted(name for name in set(saved) & trained_here if saved[name].shape != params[name].shape)
    mismatches = {"trainable weights it lacks": sorted(trained_here - set(saved)),
                  "weights this run does not train": sorted(set(saved) - trained_here),
                  "weights of another shape": reshaped}
    listed = "; ".join(f"{len(names)} {what} (e.g. {', '.join(names[:2])})"
                       for what, names in mismatches.items() if names)
    if listed:
        raise UserInputError(f"{folder} does not hold this run's trainable weights: {listed}. Resume with the settings "
                             "the run started with (trainer.mode, lora.*)")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


class DeepSpeedZero(Replicated):
    name = "deepspeed"

    def __init__(self, accelerator):
        self.plugin = accelerator.state.deepspeed_plugin
        self.zero_stage = int(self.plugin.zero_stage)
        zero = self.plugin.deepspeed_config.get("zero_optimization", {})
        offload = _offloaded(zero.get(f"offload_{k}", {}).get("device") for k in ("param", "optimizer"))
        self.engine = self.traits(self.zero_stage, offload)

    @staticmethod
    def traits(zero_stage: int, offload: bool) -> Engine:
        return Engine(f"DeepSpeed ZeRO-{zero_stage}", shards_weights=zero_stage == 3, shards_optimizer_states=True,
                      parameter_hooks=True, steps_inside_backward=True, offloads_to_host=offload,
                      kept_attention_tested=False)

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

    def save_engine_state(self, accelerator, folder: Path, model, optimizer) -> None:
        # Every process writes its shard; the frozen base is the model folder's.
        model.save_checkpoint(str(folder / "deepspeed"), tag="state", exclude_frozen_parameters=True)

    def load_engine_state(self, accelerator, folder: Path, model, optimizer) -> None:
        model.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=False,
                              load_lr_scheduler_states=False)

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

    name = "fsdp"

    def __init__(self, plugin):
        self.plugin = plugin  # accelerate's FullyShardedDataParallelPlugin
        # FSDP2's offload policy, or FSDP1's CPUOffload(offload_params)
        offload = isinstance(plugin.cpu_offload, CPUOffloadPolicy) or getattr(plugin.cpu_offload, "offload_params", 0)
        self.engine = self.traits(plugin.fsdp_version, bool(offload))

    @staticmethod
    def traits(fsdp_version: int, offload: bool) -> Engine:
        untested = (f"fsdp_version: {fsdp_version}: only FSDP2 is tested; set fsdp_version: 2 in the accelerate "
                    "config (configs/accelerate/fsdp.yaml)",)
        return Engine("FSDP", shards_weights=True, shards_optimizer_states=True, parameter_hooks=True,
                      replaces_parameters=True, offloads_to_host=offload,
                      unsupported=() if fsdp_version == 2 else untested)

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
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(model, options=options)

    def save_engine_state(self, accelerator, folder: Path, model, optimizer) -> None:
        dcp.save(_sharded_state(model, optimizer), checkpoint_id=folder / "fsdp")

    def load_engine_state(self, accelerator, folder: Path, model, optimizer) -> None:
        shards = _sharded_state(model, optimizer)
        dcp.load(shards, checkpoint_id=folder / "fsdp")  # fails on any trainable tensor the checkpoint lacks
        set_state_dict(
            model, optimizer.optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),  # the frozen base is not in it
        )


def _sharded_state(model: torch.nn.Module, optimizer) -> dict:
    """This process's shards of the trainable weights and optimizer states, keyed by parameter name (the
    frozen base is the model folder's: a checkpoint holds only what trains)."""
    options = StateDictOptions(ignore_frozen_params=True)
    weights, optimizer_state = get_state_dict(model, optimizer.optimizer, options=options)
    return {"model": weights, "optimizer": optimizer_state}


def _offloaded(devices) -> bool:
    return any(str(device or "none").lower() != "none" for device in devices)


def accelerate_config_engine(path) -> Engine:
    """The traits of the strategy an accelerate config file (configs/accelerate/*.yaml) selects, read as accelerate
    reads it: the planner asks this rather than re-deriving what each engine refuses."""
    config = yaml.safe_load(Path(path).read_text())
    zero, fsdp = config.get("deepspeed_config") or {}, config.get("fsdp_config") or {}
    if config.get("distributed_type") == DistributedType.DEEPSPEED:
        offload = _offloaded(zero.get(f"offload_{k}_device") for k in ("param", "optimizer"))
        return DeepSpeedZero.traits(int(zero.get("zero_stage", 2)), offload)
    if config.get("distributed_type") == DistributedType.FSDP:
        return FullyShardedDataParallel.traits(int(fsdp.get("fsdp_version", 1)), bool(fsdp.get("fsdp_offload_params")))
    return Replicated.engine


def accelerator_options() -> dict:
    """Keyword arguments for `Accelerator(...)` that make CPU-only runs work under every launcher.

    Without CUDA, accelerate needs `cpu=True` for multi-process runs, but `cpu=True` also switches DeepSpeed
    off; so under DeepSpeed it gets the gloo backend instead (DeepSpeed then runs on its CPU accelerator).
    """
    from accelerate.utils import InitProcessGroupKwargs

    if torch.cuda.is_available():
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


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


def stop_with_launcher() -> bool:
    """Have the kernel send this process SIGTERM when the launcher that started it dies (Linux; under accelerate
    launch or torchrun, which set LOCAL_RANK). A worker orphaned by a killed launcher would otherwise go on
    holding its GPU and the output folder's lock; SIGTERM makes the loop checkpoint and stop. True when set."""
    if not sys.platform.startswith("linux") or "LOCAL_RANK" not in os.environ:
        return False
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM) != 0:
        return False  # (a sandbox refusing prctl): the run goes on without the safety net
    if os.getppid() == 1:  # the launcher died before the request was made: no signal will come
        raise RunHalted("the launcher that started this process has already exited; stopping")
    return True
