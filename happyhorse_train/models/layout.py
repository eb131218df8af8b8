"""Checks on a diffusers-layout model folder, so a wrong path fails in one line before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

from happyhorse_train.errors import UserInputError


def check_model_folder(path: str | Path, pipeline_class: str, components: tuple[str, ...]) -> Path:
    """Return the folder if it holds a diffusers `pipeline_class` with every component; else a UserInputError."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserInputError(f"model folder not found: {folder}")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise UserInputError(
            f"{folder} is not a diffusers model folder: model_index.json is missing "
            f"(expected model_index.json and the subfolders {', '.join(components)})"
        )
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as error:
        raise UserInputError(f"{index_file} is not valid JSON ({error})") from error
    found_class = index.get("_class_name")
    if found_class != pipeline_class:
        raise UserInputError(f"{folder} holds a {found_class!r} model, not a {pipeline_class!r} one")
    missing = [name for name in components if name not in index or not (folder / name).is_dir()]
    if missing:
        raise UserInputError(f"{folder} is missing the component(s) {', '.join(missing)} (a subfolder each)")
    return folder
