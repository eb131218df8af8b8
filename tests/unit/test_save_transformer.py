"""Fully trained weights are written from the gathered state dict, not from the module (whose own state dict
holds only one process's shards under ZeRO-3 or FSDP), and load back with diffusers."""

from __future__ import annotations

import json

import pytest
import torch

from happyhorse_train.models.backbones import get_spec
from happyhorse_train.models.happyhorse import HappyHorseTransformer3DModel


def trained_weights(model_dir) -> tuple[torch.nn.Module, dict]:
    transformer = HappyHorseTransformer3DModel.from_pretrained(model_dir / "transformer")
    generator = torch.Generator().manual_seed(1)
    shapes = {name: tensor.shape for name, tensor in transformer.state_dict().items()}
    return transformer, {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


@pytest.mark.parametrize("max_shard_size", ["10GB", "200KB"], ids=["one-file", "sharded"])
def test_the_given_weights_are_written_and_load_with_diffusers(demo_model_dir, tmp_path, max_shard_size):
    transformer, weights = trained_weights(demo_model_dir)
    written = get_spec("happyhorse").save_transformer(tmp_path / "out", transformer, weights, max_shard_size)
    assert (len(written) > 2) == (max_shard_size == "200KB")  # shards and their index, or one file
    if len(written) > 1:
        index = json.loads((tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(weights)
    loaded = HappyHorseTransformer3DModel.from_pretrained(tmp_path / "out").state_dict()
    assert sorted(loaded) == sorted(weights)
    for name, tensor in weights.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


def test_a_save_over_an_earlier_sharded_one_leaves_nothing_of_it(demo_model_dir, tmp_path):
    transformer, weights = trained_weights(demo_model_dir)
    spec = get_spec("happyhorse")
    spec.save_transformer(tmp_path / "out", transformer, {k: v + 1 for k, v in weights.items()}, "200KB")
    spec.save_transformer(tmp_path / "out", transformer, weights)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = HappyHorseTransformer3DModel.from_pretrained(tmp_path / "out").state_dict()
    torch.testing.assert_close(loaded["proj_out.weight"], weights["proj_out.weight"], rtol=0, atol=0)


def test_weights_missing_a_tensor_are_refused_before_anything_is_written(demo_model_dir, tmp_path):
    transformer, weights = trained_weights(demo_model_dir)
    weights.pop("proj_out.weight")
    with pytest.raises(RuntimeError, match="lack 1 of the transformer's tensors: .*proj_out.weight"):
        get_spec("happyhorse").save_transformer(tmp_path / "out", transformer, weights)
    assert not (tmp_path / "out").exists()
