"""Shared fixtures: the tiny demo checkpoint, written once per session as a real diffusers folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    from happyhorse_train.demo.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("demo") / "model", "tiny", seed=0)


@pytest.fixture(scope="session")
def wan_model_dir(tmp_path_factory) -> Path:
    from happyhorse_train.demo.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("wan") / "model", "wan-tiny", seed=0)


def run_script(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run one of the repo's entry points as a user would, in a fresh interpreter."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if "accelerate.commands.launch" in args:  # pytest-xdist workers launch at once: one rendezvous port each
        at = args.index("accelerate.commands.launch") + 1
        args = (*args[:at], "--main_process_port", str(29500 + _worker_number()), *args[at:])
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def _worker_number() -> int:
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def make_random_lora(model_dir: Path, out_dir: Path, seed: int, rank: int = 4, scale: float = 0.5) -> Path:
    """A LoRA with non-zero weights on every attention and MLP linear, saved in the diffusers layout."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from happyhorse_train.models.happyhorse import HappyHorsePipeline, HappyHorseTransformer3DModel

    transformer = HappyHorseTransformer3DModel.from_pretrained(model_dir / "transformer")
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out", "gate_proj", "up_proj", "down_proj"]
    )
    transformer.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    HappyHorsePipeline.save_lora_weights(
        out_dir,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    return out_dir / "pytorch_lora_weights.safetensors"


def train_config(*overrides: str):
    """train.py's config composed in process: the demo experiment with `overrides`."""
    from hydra import compose, initialize_config_dir

    from happyhorse_train.config import register_configs
    from happyhorse_train.models.presets import CONFIG_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("train", overrides=["+experiment=demo", "data.dataset=unused", "output_dir=unused", *overrides])
