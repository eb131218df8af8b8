"""Every shipped model preset passes the config schema and builds at its published size (on the meta device)."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from happyhorse_train.config import register_configs
from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.presets import CONFIG_DIR

PRESETS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
# Published transformer sizes, in billions of parameters, with the tolerance each is known to.
# Wan 2.1 I2V 14B counts 16.4 B: the 14B text-to-video transformer plus 2.1 B of image cross-attention (k_img, v_img)
# and the image embedder, which its name leaves out.
EXPECTED_BILLIONS = {
    "8b": (8.0, 0.5), "8b-i2v": (8.0, 0.5), "wan2.1-1.3b": (1.42, 0.1), "wan2.1-14b": (14.3, 0.5),
    "wan2.1-i2v-14b": (16.4, 0.1), "wan2.2-ti2v-5b": (5.0, 0.3), "wan2.2-ti2v-5b-i2v": (5.0, 0.3),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_model_preset_composes_and_builds(preset):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={preset}", "data.dataset=unused", "output_dir=unused"])
    spec = get_spec(cfg.model.backbone)
    with torch.device("meta"):
        transformer = spec.transformer_class(**cfg.model.transformer)
    billions = sum(p.numel() for p in transformer.parameters()) / 1e9
    if preset in EXPECTED_BILLIONS:
        expected, tolerance = EXPECTED_BILLIONS[preset]
        assert abs(billions - expected) <= tolerance, (preset, billions)
    else:
        assert billions < 0.01, (preset, billions)  # the tiny test presets
    assert cfg.model.sample.num_frames % 4 == 1
    assert cfg.model.sample.height % 16 == 0 and cfg.model.sample.width % 16 == 0
