"""`launcher recipes validate|show|docs`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from launcher.cli.common import Overrides, console
from launcher.errors import UserError


def recipes_validate(
    paths: Annotated[list[Path], typer.Argument(help="Recipe files or directories (searched recursively).", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
) -> None:
    """Check recipes without running anything; exit 2 if any is invalid.

    Example: launcher recipes validate recipes/
    """
    from launcher.recipe import load_recipe

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(x for x in p.rglob("*.yaml"))
        elif p.exists():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    results = []
    for f in files:
        try:
            load_recipe(f)
            results.append({"path": str(f), "ok": True})
        except UserError as e:
            results.append({"path": str(f), "ok": False, "error": str(e)})
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for res in results:
            mark = "[green]ok[/]  " if res["ok"] else "[red]bad[/] "
            console.print(mark + escape(res["path"]) + ("" if res["ok"] else f"\n      {escape(res['error'])}"), highlight=False)
    if not all(r["ok"] for r in results):
        raise typer.Exit(2)


def recipes_show(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False,
    resolve: Annotated[
        bool, typer.Option("--resolve", help="Show values read from the environment instead of ${oc.env:...}.")
    ] = False,
) -> None:
    """Print the fully resolved recipe (defaults, inheritance and overrides applied).

    Values read from the environment are shown as their ${oc.env:NAME} references (they may be
    secrets); --resolve shows the values.

    Example: launcher recipes show recipes/examples/tiny-sft.yaml train.lr=1e-3
    """
    from launcher.recipe import load_recipe, to_dict, to_yaml

    r = load_recipe(recipe, overrides or [])
    text = json.dumps(to_dict(r, resolve=resolve), indent=2) if as_json else to_yaml(r, resolve=resolve)
    print(text, end="" if not as_json else "\n")


def recipes_docs(
    out: Annotated[Optional[Path], typer.Option("--out", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the recipe reference (every key, type, default and description) as Markdown.

    Example: launcher recipes docs --out docs/recipe-reference.md
    """
    from launcher.recipe.docs import reference_markdown

    text = reference_markdown()
    if out:
        out.write_text(text)
        console.print(f"wrote {out}", highlight=False, markup=False)
    else:
        print(text)
