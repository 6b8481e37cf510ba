"""`launcher estimate RECIPE --apply N`: the search's layout N as a recipe file to run.

The file sits next to the recipe, inherits it (`defaults: [recipe.yaml]`) and sets only what the
layout changes, plus the `key=value` overrides given on the command line, so `launcher run` on it
trains exactly the estimated layout and `git diff` shows the change. `--model` has no recipe to
inherit: the overrides are printed instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UserError
from launcher.estimate.hardware import GiB


def chosen(est: Any, n: int) -> Any:
    """Suggestion `n` (1-based, as printed) of the estimate's search."""
    if not est.suggestions:
        raise UserError(f"--apply {n}: no layout in the search fits; try a larger GPU (--gpu) or a shorter "
                        "data.max_seq_len")
    if not 1 <= n <= len(est.suggestions):
        raise UserError(f"--apply {n}: choose one of the {len(est.suggestions)} layouts listed (1-{len(est.suggestions)})")
    return est.suggestions[n - 1]


def _nested(overrides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
    return out


def layout_recipe_path(recipe_path: Path, n: int) -> Path:
    return recipe_path.with_name(f"{recipe_path.stem}.layout-{n}.yaml")


def resources_overrides(recipe: Any, est: Any, s: Any) -> list[str]:
    """The GPU type and count estimated for (`--gpu`, `--nodes`, `--gpus-per-node` included) where
    they differ from the recipe's `resources`."""
    res, lay, out = recipe.resources, s.layout, []
    if est.gpu is not None and res.gpu != est.gpu.name:
        out.append(f"resources.gpu={est.gpu.name}")
    if lay is not None and res.nodes != lay.nodes:
        out.append(f"resources.nodes={lay.nodes}")
    if lay is not None and res.gpus_per_node != lay.gpus_per_node:
        out.append(f"resources.gpus_per_node={lay.gpus_per_node}")
    return out


def write_layout_recipe(recipe_path: str, recipe: Any, cli_overrides: list[str], est: Any, n: int) -> Path:
    """Write suggestion `n` as `<recipe>.layout-<n>.yaml` beside the recipe; returns its path."""
    s = chosen(est, n)
    src = Path(recipe_path)
    out = layout_recipe_path(src, n)
    gpu = est.gpu.name if est.gpu else "GPU"
    head = [f"# Written by `launcher estimate {src.name} --apply {n}`: {s.description}.",
            f"# Estimated {s.per_gpu_total_bytes / GiB:,.2f} GiB per {gpu}"
            + (f", step {s.step_time_s:,.2f} s" if s.step_time_s is not None else "")
            + (f", ${s.total_usd:,.0f} for the run" if s.total_usd is not None else "") + "."]
    body = {"defaults": [src.name],
            **_nested(list(cli_overrides) + s.overrides() + resources_overrides(recipe, est, s))}
    try:
        out.write_text("\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False))
    except OSError as e:
        raise UserError(f"--apply {n}: cannot write {out}: {e.strerror}") from None
    return out
