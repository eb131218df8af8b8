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
    sample: SampleDefaults = field(default_factory=SampleDefaults)


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


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="sample_schema", node=SampleConfig)
