"""Which settings combine: the one rule book that train.py's config check, the distributed strategies, sample.py
and the memory planner all ask (a module of its own: each of them asks it), so none recommends what another
refuses. Engines are described by what they do (`Engine`); training/distributed.py's strategies own theirs."""

from __future__ import annotations

from dataclasses import dataclass

from happyhorse_train.config import validation_on
from happyhorse_train.memory.quantize import BASE_WEIGHT_FORMATS


@dataclass(frozen=True)
class Engine:
    """What an engine (how accelerate spreads a training run) does, as far as the settings that work care."""

    label: str = "one process"  # in messages: "DeepSpeed ZeRO-3", "FSDP"
    shards_weights: bool = False  # no process holds the whole weights (EMA and rendering need them)
    shards_optimizer_states: bool = False  # each process keeps its part of the optimizer states
    parameter_hooks: bool = False  # gathers, partitions or reduces through hooks of its own on the parameters
    steps_inside_backward: bool = False  # it owns the optimizer step (and its fp32 master copy), run in backward
    replaces_parameters: bool = False  # `prepare` swaps the parameters for sharded tensors (FSDP2's DTensors)
    offloads_to_host: bool = False  # weights and optimizer states live in host RAM between uses
    kept_attention_tested: bool = True  # memory.saved_attention_blocks has been tested under its hooks
    unsupported: tuple[str, ...] = ()  # problems of the engine's own configuration, whatever the settings


def combination_problems(cfg, engine: Engine = Engine(), sampling: bool = False) -> list[str]:
    """One line per setting of `cfg` that does not work with the others: train.py's config trained under
    `engine`, or with `sampling`, sample.py's (memory.*, compile)."""
    memory = cfg.memory
    compile_key, compile = ("compile", cfg.compile) if sampling else ("trainer.compile", cfg.trainer.compile)
    counts = {"blocks_to_swap": "", **({"ffn_chunk_tokens": "(off) "} if sampling else {"saved_attention_blocks": ""})}
    rules = [
        (memory.base_weights not in BASE_WEIGHT_FORMATS,
         f"memory.base_weights={memory.base_weights!r}: use one of {', '.join(BASE_WEIGHT_FORMATS)}"),
        *((getattr(memory, key) < 0, f"memory.{key}={getattr(memory, key)}: must be 0 {off}or more")
          for key, off in counts.items()),
        (compile and memory.blocks_to_swap,
         f"{compile_key}: block swap moves weights from hooks inside the blocks; set one of the two"),
    ]
    rules += _sampling_rules(memory) if sampling else _training_rules(cfg) + _engine_rules(cfg, engine)
    return [message for broken, message in rules if broken]


def _sampling_rules(memory) -> list[tuple[bool, str]]:
    return [
        (memory.offload_models and memory.blocks_to_swap, "memory.offload_models moves the whole transformer on and "
         "off the GPU; it and memory.blocks_to_swap exclude each other (set one)"),
        (memory.offload_models and memory.base_weights != "bf16", f"memory.offload_models with memory.base_weights="
         f"{memory.base_weights}: quantized weights stay on the GPU; set one of the two"),
    ]


def _training_rules(cfg) -> list[tuple[bool, str]]:
    memory, lora, checkpointing = cfg.memory, cfg.trainer.mode == "lora", cfg.trainer.gradient_checkpointing
    return [
        (memory.base_weights != "bf16" and not lora,
         f"memory.base_weights={memory.base_weights}: quantized base weights are frozen; use trainer.mode=lora"),
        (memory.blocks_to_swap and not lora,
         "memory.blocks_to_swap: swaps frozen weights only; use trainer.mode=lora (or DeepSpeed ZeRO-3 offload)"),
        *((getattr(memory, key) and not checkpointing,
           f"memory.{key} needs trainer.gradient_checkpointing=true (blocks must keep nothing between passes)")
          for key in ("blocks_to_swap", "offload_activations", "saved_attention_blocks")),
        (memory.saved_attention_blocks and memory.offload_activations,
         "memory.saved_attention_blocks: offloaded checkpointing keeps block inputs only; set one of the two"),
    ]


def _engine_rules(cfg, engine: Engine) -> list[tuple[bool, str]]:
    memory, name, hooks = cfg.memory, engine.label, engine.parameter_hooks
    # The settings made for one GPU are refused under an engine with hooks: it shards instead, its hooks are untested.
    return [(True, problem) for problem in engine.unsupported] + [
        (engine.shards_weights and cfg.trainer.ema,
         f"trainer.ema=true: EMA needs whole weights in every process, {name} shards them"),
        (engine.shards_weights and validation_on(cfg), f"validation.every: rendering needs whole weights, {name} "
         "shards them; set validation.every=0 and render from the saved LoRA with sample.py"),
        (hooks and memory.base_weights != "bf16", f"memory.base_weights={memory.base_weights}: quantized base weights "
         f"save memory on one GPU; under {name} use bf16 and let it shard them"),
        (hooks and memory.offload_activations,
         f"memory.offload_activations: untested with {name}'s parameter hooks; it shards instead"),
        (hooks and cfg.trainer.compile, f"trainer.compile: untested with {name}'s parameter hooks"),
        (hooks and memory.blocks_to_swap, f"memory.blocks_to_swap: block swap is for one GPU; {name} shards instead"),
        (hooks and memory.saved_attention_blocks and not engine.kept_attention_tested,
         f"memory.saved_attention_blocks: untested with {name}'s parameter hooks"),
        (engine.replaces_parameters and cfg.optimizer.name != "adamw",
         f"optimizer.name={cfg.optimizer.name}: untested on {name}'s sharded parameters; use adamw"),
    ]
