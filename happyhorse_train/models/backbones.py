"""Every backbone, by its `model.backbone` name: the one place that knows them all."""

from __future__ import annotations

import json
from pathlib import Path

from happyhorse_train.errors import UserInputError
from happyhorse_train.models.happyhorse.spec import HappyHorseSpec
from happyhorse_train.models.spec import ModelSpec
from happyhorse_train.models.wan.image_to_video import WanImageSpec
from happyhorse_train.models.wan.text_to_video import WanSpec

BACKBONES: dict[str, type[ModelSpec]] = {"happyhorse": HappyHorseSpec, "wan": WanSpec, "wan-i2v": WanImageSpec}


def get_spec(backbone: str, max_sequence_length: int = 512) -> ModelSpec:
    if backbone not in BACKBONES:
        raise UserInputError(f"model.backbone={backbone!r} is unknown; use one of {', '.join(sorted(BACKBONES))}")
    return BACKBONES[backbone](max_sequence_length)


def spec_for_folder(path: str | Path, max_sequence_length: int = 512) -> ModelSpec:
    """The spec whose pipeline class a model folder's model_index.json names."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserInputError(f"model folder not found: {folder}")
    index = folder / "model_index.json"
    if not index.is_file():
        raise UserInputError(f"{folder} is not a diffusers model folder: model_index.json is missing")
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError as error:
        raise UserInputError(f"{index} is not valid JSON ({error})") from error
    for spec_class in BACKBONES.values():
        if spec_class.pipeline_class.__name__ == class_name:
            return spec_class(max_sequence_length)
    known = ", ".join(c.pipeline_class.__name__ for c in BACKBONES.values())
    raise UserInputError(f"{path}: no backbone for a model folder of class {class_name!r} (known: {known})")
