"""The recipes (``configs/``) and cluster examples (``cluster_configs/``) that ship with the code,
found by name (``--config cifar10_resnet18``) or by path, from any working folder.

A clone keeps them at its top level; a wheel (``pip install .``, ``pip install git+...``) carries a
copy inside the ``trainer`` package (``trainer/_recipes/``, written by ``setup.py`` at build time),
so that an installed ``simclr demo`` finds its recipe wherever it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from trainer.runtime.dataclass_yaml import ConfigError

RecipeKind = Literal["configs", "cluster_configs"]
TRAINER = Path(__file__).resolve().parents[1]  # the trainer package (this module is in trainer/runtime/)
PACKAGED = TRAINER / "_recipes"
CLONE = TRAINER.parent


def recipe_folders(kind: RecipeKind) -> list[Path]:
    """Where recipes of ``kind`` live: the packaged copy (an installed wheel), then the clone's own."""
    return [folder for folder in (PACKAGED / kind, CLONE / kind) if folder.is_dir()]


def recipe_names(kind: RecipeKind) -> list[str]:
    return sorted({p.stem for folder in recipe_folders(kind) for p in folder.glob("*.yaml")})


def find_recipe(name_or_path: str | Path, kind: RecipeKind = "configs") -> Path:
    """A YAML file: ``name_or_path`` itself when it exists, else the shipped recipe of that name
    (``cifar10_resnet18``, ``cifar10_resnet18.yaml`` or ``configs/cifar10_resnet18.yaml``)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    parts = path.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == kind):
        stem = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
        for folder in recipe_folders(kind):
            if (folder / f"{stem}.yaml").is_file():
                return folder / f"{stem}.yaml"
    what = "config file" if kind == "configs" else "cluster config"
    raise ConfigError(f"{what} {name_or_path} does not exist and names no shipped recipe; give a path, or one of: "
                      f"{', '.join(recipe_names(kind)) or '(none found)'}")
