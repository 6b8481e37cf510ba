"""Read a recipe file: inherit from `defaults`, apply `key=value` overrides, validate."""

from __future__ import annotations

import copy
import json
import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.errors import COMMAND_LINE, RecipeError, UserError
from launcher.recipe.checks import check_combinations
from launcher.recipe.convert import FromEnv, build, from_env, redact
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

DATA_SOURCES = ("path", "hub", "synthetic", "sources")
"""The keys of `data` that name where the data comes from; exactly one may be set (`sources`: a mixture)."""


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


_ENV = re.compile(r"\$\{oc\.env:[^${}]*\}")
"""A `${oc.env:NAME}` or `${oc.env:NAME,default}` interpolation with a literal name."""
_ONLY_OC = re.compile(r"\$\{(?!oc\.)")
"""Matches an interpolation that is not an `oc.*` resolver (one that names another key)."""


def _escape_env(node: Any) -> Any:
    """`node` with every `${oc.env:...}` escaped, so that resolving it yields the reference."""
    if isinstance(node, dict):
        return {k: _escape_env(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape_env(v) for v in node]
    if isinstance(node, str):
        return _ENV.sub(lambda m: "\\" + m.group(0), node)
    return node


def _reference(raw: Any, shown: Any, key: str) -> str | None:
    """What to record for a leaf instead of its value: None when it does not come from the
    environment. `raw` is the leaf as written, `shown` as resolved with env references escaped."""
    if isinstance(raw, str) and "${oc.env:" in raw and not _ONLY_OC.search(raw):
        return raw  # self-contained: `${oc.env:X}`, `x-${oc.env:X}`, `${oc.decode:${oc.env:X}}`
    if isinstance(shown, str) and _ENV.search(shown):
        return shown  # another key's environment value, maybe inside a longer string
    if isinstance(raw, str) and "${oc.env:" in raw:
        raise RecipeError(key, "name the variable literally, e.g. ${oc.env:WANDB_ENTITY}: a name "
                               "read from another key cannot be recorded without its value")
    return None


def _mark_env(value: Any, raw: Any, shown: Any, key: str) -> Any:
    """`value` (resolved) with each leaf read from the environment marked with its reference."""
    if isinstance(value, dict) and isinstance(raw, dict) and isinstance(shown, dict):
        return {k: _mark_env(v, raw.get(k), shown.get(k), f"{key}.{k}" if key else str(k))
                for k, v in value.items()}
    if isinstance(value, list) and isinstance(raw, list) and isinstance(shown, list):
        return [_mark_env(v, r, s, f"{key}[{i}]") for i, (v, r, s) in enumerate(zip(value, raw, shown))]
    ref = _reference(raw, shown, key)
    return value if ref is None else from_env(value, ref)


def _to_data(cfg: DictConfig, path: str | Path) -> dict[str, Any]:
    """`cfg` resolved, with the values read from the environment marked (see `FromEnv`)."""
    try:
        value = OmegaConf.to_container(cfg, resolve=True)
        raw = OmegaConf.to_container(cfg, resolve=False)
        shown = OmegaConf.to_container(OmegaConf.create(_escape_env(raw)), resolve=True)
    except OmegaConfBaseException as e:
        raise UserError(f"{path}: cannot resolve interpolation: {_env_hint(e)}") from None
    try:
        return _mark_env(value, raw, shown, "")  # type: ignore[return-value]
    except RecipeError as e:
        raise e.with_source(str(path)) from None


def _env_hint(e: OmegaConfBaseException) -> str:
    first = str(e).splitlines()[0]
    m = re.search(r"Environment variable '([^']+)' not found", first)
    if not m:
        return first
    where = f" (read by {e.full_key})" if getattr(e, "full_key", None) else ""
    return (f"environment variable {m.group(1)} is not set{where}: export it; a run directory records "
            f"${{oc.env:{m.group(1)}}}, not its value, so a resume needs it set too")


def resolve_traced(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], Origins]:
    """The fully merged recipe as plain data, and where each of its values was set. Values read
    through `${oc.env:...}` are marked with their reference (see `FromEnv`)."""
    origins: Origins = {}
    cfg = _apply_overrides(_load_tree(Path(path), origins, str(path)), overrides, origins)
    return _to_data(cfg, path), origins


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


def _resolve_references(node: Any, key: str) -> Any:
    """`node` with each `${oc.env:...}` reference (what `to_dict` writes) resolved from this
    machine's environment and marked, so that it is written back as the reference again."""
    if isinstance(node, dict):
        return {k: _resolve_references(v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_references(v, f"{key}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str) or isinstance(node, FromEnv) or not _ENV.search(node):
        return node
    try:
        value = OmegaConf.create({"v": node}).v
    except OmegaConfBaseException as e:
        raise RecipeError(key, f"cannot resolve {node}: {_env_hint(e)}") from None
    return from_env(value, node)


def from_dict(data: dict[str, Any], source: str | None = None, origins: Origins | None = None) -> Recipe:
    """Validate plain data into a Recipe; errors name the key, `source`, and where the value
    was set when `origins` (from `resolve_traced`) says it was elsewhere."""
    try:
        recipe = build(Recipe, _resolve_references(data, ""))
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


def to_dict(recipe: Recipe, *, resolve: bool = False) -> dict[str, Any]:
    """The recipe as plain data with every default filled in (what `recipe.yaml` records).

    A value read from the environment appears as its reference, `${oc.env:NAME}`, never as the
    value: this is what is written to disk, logged, sent to W&B and shipped to Ray workers, which
    resolve it again from their own environment (`from_dict`). `resolve=True` gives the values,
    for the user's own terminal only."""
    data = dataclasses.asdict(recipe)
    return redact(data, keep_values=resolve)


def env_variables(recipe: Recipe) -> list[str]:
    """The environment variables the recipe reads (`${oc.env:NAME}`), which every node that
    loads it needs set: a backend can pass them on (e.g. as SkyPilot secrets)."""
    text = json.dumps(to_dict(recipe))
    return sorted(set(re.findall(r"\$\{oc\.env:([^,}$]+)", text)))


def to_yaml(recipe: Recipe, *, resolve: bool = False) -> str:
    """`to_dict` as YAML: what `recipe.yaml` holds."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(recipe, resolve=resolve)))
