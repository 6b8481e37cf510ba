"""Read a recipe file: inherit from `defaults`, apply `key=value` overrides, validate."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.errors import COMMAND_LINE, RecipeError, UserError
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


def _display(path: Path) -> str:
    """A base recipe's path as messages show it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


Origins = dict[str, str]
"""Dotted leaf key (`data.hub`, `train.lr`) -> where its value was set: a recipe file's path or
COMMAND_LINE. A list is one leaf; a mapping set to null is a leaf too."""

DATA_SOURCES = ("path", "hub", "synthetic")
"""The keys of `data` that name where the data comes from; exactly one may be set."""


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):  # an empty mapping merges into nothing: no leaf
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if prefix else []


def _is_set(value: Any) -> bool:
    return value is not None and value != [] and value != ""


def _merge(
    lower: DictConfig, upper: DictConfig, origin: str, origins: Origins, upper_origins: Origins | None = None
) -> DictConfig:
    """`upper` over `lower`, recording in `origins` that `upper`'s values came from `origin`
    (or from where `upper_origins` says, for a base that has bases of its own).

    A data source set in `upper` (data.path, data.hub or data.synthetic) replaces the one
    `lower` set: a recipe that reads its own files from a base that names a hub dataset means
    "these files instead", not "both" (which validation would refuse)."""
    plain = OmegaConf.to_container(upper, resolve=False)
    assert isinstance(plain, dict)
    data = plain.get("data")
    if isinstance(data, dict) and any(_is_set(data.get(k)) for k in DATA_SOURCES):
        lower_data = lower.get("data")
        if isinstance(lower_data, DictConfig):
            lower = copy.deepcopy(lower)
            for k in DATA_SOURCES:
                if k not in data and k in lower_data:
                    del lower["data"][k]
                    _forget(origins, f"data.{k}")
    for leaf in _leaves(plain):
        _forget(origins, leaf)
        origins[leaf] = (upper_origins or {}).get(leaf, origin)
    return OmegaConf.merge(lower, upper)  # type: ignore[return-value]


def _forget(origins: Origins, key: str) -> None:
    """Drop what `origins` says about `key`, the keys below it and a leaf above it: a new value
    at `key` replaces all of them."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        origins.pop(".".join(parts[:i]), None)
    for k in [k for k in origins if k == key or k.startswith(key + ".")]:
        del origins[k]


def _load_tree(
    path: Path, origins: Origins, name: str | None = None, seen: tuple[Path, ...] = ()
) -> DictConfig:
    """The recipe at `path` merged over its `defaults`, filling `origins` (`name`: how messages
    show this file; default: its path relative to the working directory)."""
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
        base_file = _find_base(str(entry), path)
        base_origins: Origins = {}
        base = _load_tree(base_file, base_origins, None, (*seen, path))
        merged = _merge(merged, base, _display(base_file), origins, base_origins)
    return _merge(merged, cfg, name or _display(path), origins)


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str], origins: Origins) -> DictConfig:
    items = []
    for item in overrides:
        if "=" not in item or item.lstrip("+").startswith("="):
            raise UserError(f"override '{item}' is not key=value, e.g. train.max_steps=100")
        items.append(item.removeprefix("+"))  # Hydra's "+key=value" spelling; new keys are allowed anyway
    try:
        return _merge(cfg, OmegaConf.from_dotlist(items), COMMAND_LINE, origins)
    except OmegaConfBaseException as e:
        raise UserError(f"cannot apply overrides: {str(e).splitlines()[0]}") from None


def resolve_traced(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], Origins]:
    """The fully merged recipe as plain data, and where each of its values was set."""
    origins: Origins = {}
    cfg = _apply_overrides(_load_tree(Path(path), origins, str(path)), overrides, origins)
    try:
        return OmegaConf.to_container(cfg, resolve=True), origins  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise UserError(f"{path}: cannot resolve interpolation: {str(e).splitlines()[0]}") from None


def resolve(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The fully merged recipe as plain data (defaults, file, overrides, interpolations)."""
    return resolve_traced(path, overrides)[0]


def origin_of(key: str, origins: Origins) -> str | None:
    """Where the value a RecipeError names was set: the key itself, a leaf above it (a list
    element, a key inside a mapping set whole), or the one origin of every value below it."""
    key = re.sub(r"\[\d+\]", "", key)
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        found = origins.get(".".join(parts[:i]))
        if found is not None:
            return found
    below = {v for k, v in origins.items() if k.startswith(key + ".")}
    return below.pop() if len(below) == 1 else None


def from_dict(data: dict[str, Any], source: str | None = None, origins: Origins | None = None) -> Recipe:
    """Validate plain data into a Recipe; errors name the key, `source`, and where the value
    was set when `origins` (from `resolve_traced`) says it was elsewhere."""
    try:
        recipe = build(Recipe, data)
        check_combinations(recipe)
    except RecipeError as e:
        if not source:
            raise
        raise e.with_source(source, origin_of(e.key, origins or {})) from None
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, inherit, override and validate a recipe file."""
    data, origins = resolve_traced(path, overrides)
    return from_dict(data, source=str(path), origins=origins)


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data with every default filled in (what `recipe.yaml` records)."""
    return dataclasses.asdict(recipe)


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(recipe)))
