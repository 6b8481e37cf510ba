"""Read a recipe file: inherit from `defaults`, apply `key=value` overrides, validate."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.errors import RecipeError, UserError
from launcher.recipe.checks import check_combinations
from launcher.recipe.convert import build
from launcher.recipe.sections import Recipe

RECIPES_ROOT = Path(__file__).resolve().parents[2] / "recipes"
"""The recipes shipped with the project; `defaults` entries are also looked up here."""


def _read_yaml(path: Path) -> DictConfig:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read recipe ({e.strerror})") from None
    try:
        cfg = OmegaConf.create(text)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{path}: a recipe must be a mapping of sections, e.g. 'name: my-run'")
    return cfg


def _find_base(entry: str, relative_to: Path) -> Path:
    for candidate in (relative_to.parent / entry, RECIPES_ROOT / entry):
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(
        f"{relative_to}: defaults entry '{entry}' not found next to the recipe or under {RECIPES_ROOT}"
    )


def _load_tree(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise UserError(f"recipe defaults form a cycle: {chain}")
    cfg = _read_yaml(path)
    defaults = cfg.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not OmegaConf.is_list(defaults) and not isinstance(defaults, list):
        raise RecipeError("defaults", "expected a list of base recipe files", source=str(path))
    merged = OmegaConf.create({})
    for entry in defaults:
        base = _load_tree(_find_base(str(entry), path), (*seen, path))
        merged = OmegaConf.merge(merged, base)
    return OmegaConf.merge(merged, cfg)


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    items = []
    for item in overrides:
        if "=" not in item or item.lstrip("+").startswith("="):
            raise UserError(f"override '{item}' is not key=value, e.g. train.max_steps=100")
        items.append(item.removeprefix("+"))  # Hydra's "+key=value" spelling; new keys are allowed anyway
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(items))
    except OmegaConfBaseException as e:
        raise UserError(f"cannot apply overrides: {str(e).splitlines()[0]}") from None


def resolve(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The fully merged recipe as plain data (defaults, file, overrides, interpolations)."""
    cfg = _apply_overrides(_load_tree(Path(path)), overrides)
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise UserError(f"{path}: cannot resolve interpolation: {str(e).splitlines()[0]}") from None


def from_dict(data: dict[str, Any], source: str | None = None) -> Recipe:
    """Validate plain data into a Recipe; errors name the key (and `source`)."""
    try:
        recipe = build(Recipe, data)
        check_combinations(recipe)
    except RecipeError as e:
        raise (e.with_source(source) if source else e) from None
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, inherit, override and validate a recipe file."""
    return from_dict(resolve(path, overrides), source=str(path))


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data with every default filled in (what `recipe.yaml` records)."""
    return dataclasses.asdict(recipe)


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(recipe)))
