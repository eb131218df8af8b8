"""Model presets: the YAML files in configs/model/, read as plain dicts."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from happyhorse_train.errors import UserInputError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def load_preset(name_or_path: str | Path) -> dict:
    """A preset by name (`tiny`, `8b`: configs/model/<name>.yaml) or by path to a YAML file.

    A preset may build on others of its folder as Hydra composes it: `defaults: [<preset>, _self_]` merges the
    named presets first, then its own values over them."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "model" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
        raise UserInputError(f"no model preset {str(name_or_path)!r}; known presets: {', '.join(known)}")
    return OmegaConf.to_container(_composed(path), resolve=True)


def _composed(path: Path, seen: tuple[Path, ...] = ()):
    if path in seen:
        raise UserInputError(f"{path}: its defaults come back to it ({' -> '.join(p.stem for p in (*seen, path))})")
    if not path.is_file():
        raise UserInputError(f"{seen[-1]}: its defaults name {path.stem!r}, but there is no {path}")
    own = OmegaConf.load(path)
    defaults = list(own.pop("defaults", None) or ["_self_"])
    if "_self_" not in defaults:
        raise UserInputError(f"{path}: its defaults list needs _self_ (after the presets its values override)")
    parts = [own if entry == "_self_" else _composed(path.parent / f"{entry}.yaml", (*seen, path))
             for entry in defaults]
    return OmegaConf.merge(*parts)
