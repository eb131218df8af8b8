"""The one rule book (happyhorse_train/combinations.py) against what the planner recommends: every setting the
planner can print, pasted after train.py, passes train.py's config check and the check of the strategy its
accelerate config selects."""

from __future__ import annotations

import pytest
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

from happyhorse_train.errors import UserInputError
from happyhorse_train.models.presets import CONFIG_DIR, load_preset
from happyhorse_train.planner import PlanRequest, candidate_settings
from happyhorse_train.planner.assumptions import ACCELERATE_CONFIGS
from happyhorse_train.planner.estimates import kept_attention_variants, swap_variants
from happyhorse_train.training.config_checks import check_train_config
from happyhorse_train.training.distributed import (
    DeepSpeedZero,
    FullyShardedDataParallel,
    Replicated,
    accelerate_config_engine,
)
from tests.conftest import train_config

PRESETS = sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))
SIZES = ((720, 480, 121), (720, 480, 49))


def _printable_settings() -> dict[tuple, set]:
    """{(mode, candidate): every block-swap / kept-attention variant of it that `plan` may print}, over every shipped
    preset, LoRA and full, one GPU and four, at SIZES. The estimates (which pick one variant each) are skipped."""
    printable = {}
    for preset in PRESETS:
        num_blocks = load_preset(preset)["transformer"]["num_layers"]
        for lora_rank in (32, None):
            for num_gpus, size in ((g, s) for g in (1, 4) for s in SIZES):
                request = PlanRequest(preset, 24, 64, *size, num_gpus=num_gpus, lora_rank=lora_rank)
                for candidate in candidate_settings(request):
                    variants = printable.setdefault((request.mode, candidate), set())
                    for swapped in [candidate, *swap_variants(request, candidate, num_blocks)]:
                        variants.update([swapped, *kept_attention_variants(request, swapped, num_blocks)])
    return printable


def test_every_setting_the_planner_can_print_passes_train_pys_checks(tmp_path):
    (tmp_path / "manifest.parquet").write_text("")  # what check_train_config looks for in a dataset folder
    strategies = {}
    printable = _printable_settings()
    assert {candidate.accelerate_config for _, candidate in printable} == {None, *ACCELERATE_CONFIGS}
    composed = {}
    for (mode, candidate), variants in printable.items():
        overrides = (f"trainer.mode={mode}", *candidate.overrides())
        if overrides not in composed:  # the same line under another accelerate config
            # The demo experiment renders validation videos; the planner's line lands on train.yaml's default (none).
            composed[overrides] = train_config(*overrides, "validation.every=0", f"data.dataset={tmp_path}",
                                               f"output_dir={tmp_path / 'run'}")
        cfg = composed[overrides]
        if candidate.accelerate_config not in strategies:
            file = candidate.accelerate_file() or "configs/accelerate/single_gpu.yaml"
            strategies[candidate.accelerate_config] = strategy = Replicated()
            strategy.engine = accelerate_config_engine(CONFIG_DIR.parent / file)  # what its strategy would have
        for setting in sorted(variants, key=lambda s: (s.blocks_to_swap, s.saved_attention_blocks)):
            cfg.memory.blocks_to_swap = setting.blocks_to_swap
            cfg.memory.saved_attention_blocks = setting.saved_attention_blocks
            try:
                # Every strategy's check (one method, the config's traits) asks the rule book that check_train_config
                # asks, engine-free rules included; the whole config check runs once per swap count (it is slower).
                strategies[candidate.accelerate_config].check_supported(cfg)
                if setting.saved_attention_blocks in (0, 1):
                    check_train_config(cfg)
            except UserInputError as error:
                pytest.fail(f"the planner can print {setting.changed_overrides()} ({mode}), train.py refuses: {error}")


def test_each_shipped_accelerate_config_maps_to_the_traits_its_strategy_has_under_accelerate():
    path = CONFIG_DIR / "accelerate"
    assert accelerate_config_engine(path / "single_gpu.yaml") == Replicated().engine
    assert accelerate_config_engine(path / "multi_gpu.yaml") == Replicated().engine
    fsdp = FullyShardedDataParallel(FullyShardedDataParallelPlugin(fsdp_version=2))
    assert accelerate_config_engine(path / "fsdp.yaml") == fsdp.engine
    for name, stage, offload in (("zero2", 2, "none"), ("zero3", 3, "none"), ("zero3_offload", 3, "cpu")):
        plugin = DeepSpeedPlugin(zero_stage=stage, offload_param_device=offload, offload_optimizer_device=offload)
        accelerator = type("Accelerator", (), {"state": type("State", (), {"deepspeed_plugin": plugin})})
        assert accelerate_config_engine(path / f"deepspeed_{name}.yaml") == DeepSpeedZero(accelerator).engine, name
