"""Structured configs: the schema every YAML under configs/ and every command-line override is checked against.

OmegaConf rejects an unknown key or a value of the wrong type here, naming the key, before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class SampleDefaults:
    height: int = 480
    width: int = 720
    num_frames: int = 121
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    max_sequence_length: int = 512


@dataclass
class ModelConfig:
    backbone: str = "happyhorse"
    preset: str = "???"
    path: Optional[str] = None
    transformer: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    image_encoder: dict[str, Any] = field(default_factory=dict)  # CLIP vision encoder (Wan 2.1 image to video)
    image_processor: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)  # the pipeline's own config (Wan's expand_timesteps)
    sample: SampleDefaults = field(default_factory=SampleDefaults)


@dataclass
class SampleMemoryConfig:
    base_weights: str = "bf16"
    blocks_to_swap: int = 0
    offload_models: bool = False
    ffn_chunk_tokens: int = 0


@dataclass
class SampleConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    height: int = "${model.sample.height}"  # type: ignore[assignment]
    width: int = "${model.sample.width}"  # type: ignore[assignment]
    num_frames: int = "${model.sample.num_frames}"  # type: ignore[assignment]
    num_inference_steps: int = "${model.sample.num_inference_steps}"  # type: ignore[assignment]
    guidance_scale: float = "${model.sample.guidance_scale}"  # type: ignore[assignment]
    max_sequence_length: int = "${model.sample.max_sequence_length}"  # type: ignore[assignment]
    seed: int = 0
    loras: list[str] = field(default_factory=list)
    lora_scales: list[float] = field(default_factory=list)
    output_dir: str = "samples"
    fps: int = 24
    device: str = "auto"
    dtype: str = "auto"
    memory: SampleMemoryConfig = field(default_factory=SampleMemoryConfig)
    compile: bool = False
    contact_sheet: bool = False
    reference_dataset: Optional[str] = None
    image: Any = None  # an image-to-video model's first frame: a path, or a list of one path per prompt


@dataclass
class DataConfig:
    dataset: str = "???"
    cache: Optional[str] = None
    verify_cache: bool = True
    batch_size: int = 1
    num_workers: int = 0
    caption_dropout: float = 0.1
    max_sequence_length: int = "${model.sample.max_sequence_length}"  # type: ignore[assignment]


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None
    init: str = "default"
    save_formats: Optional[list[str]] = None  # None: the backbone's (ModelSpec.default_lora_formats)


@dataclass
class FlowMatchingConfig:
    sigma_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    resolution_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_tokens: int = 256
    max_tokens: int = 4096
    loss_weighting: str = "none"


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    scheduler: str = "constant"
    warmup_steps: int = 0


@dataclass
class TrainerConfig:
    mode: str = "lora"
    max_steps: int = 1000
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 10
    ema: bool = False
    ema_decay: float = 0.999
    max_consecutive_nonfinite: int = 10
    compile: bool = False


@dataclass
class MemoryConfig:
    base_weights: str = "bf16"
    blocks_to_swap: int = 0
    offload_activations: bool = False
    saved_attention_blocks: int = 0


@dataclass
class ValidationConfig:
    every: int = 0
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    height: int = "${model.sample.height}"  # type: ignore[assignment]
    width: int = "${model.sample.width}"  # type: ignore[assignment]
    num_frames: int = 17
    num_inference_steps: int = 20
    guidance_scale: float = "${model.sample.guidance_scale}"  # type: ignore[assignment]
    max_sequence_length: int = "${data.max_sequence_length}"  # type: ignore[assignment]
    seed: int = 0
    images: list[str] = field(default_factory=list)  # image-to-video models: each prompt's first frame (or one)


@dataclass
class EvalConfig:
    every: int = 250
    held_out: float = 0.05
    dataset: Optional[str] = None
    held_out_clips: int = 4
    train_clips: int = 2
    sigmas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])


@dataclass
class LoggingConfig:
    logger: str = "wandb"
    wandb_mode: str = "offline"
    project: str = "happyhorse-train"
    run_name: Optional[str] = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str = "???"
    seed: int = 0
    resume: Optional[str] = None


def validation_on(cfg) -> bool:
    """Whether a training run renders validation samples: it needs both a period and prompts."""
    return bool(cfg.validation.every and cfg.validation.prompts)


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="train_schema", node=TrainConfig)
