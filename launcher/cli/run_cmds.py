"""`launcher run` and `launcher plot`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from launcher.cli.common import Overrides, console, run_and_report


def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    overrides: Overrides = None,
    run_dir: Annotated[
        Optional[Path], typer.Option("--run-dir", help="Run directory (default: runs/<name>-<time>).")
    ] = None,
    ray_address: Annotated[
        Optional[str],
        typer.Option("--ray-address", help="Join this Ray cluster instead of starting one (or set RAY_ADDRESS)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume/--no-resume", help="Resume RUN_DIR from its newest committed checkpoint; "
                     "--no-resume moves the earlier run aside and starts over."),
    ] = True,
) -> None:
    """Train a recipe here, in the foreground, on a local Ray cluster.

    Writes RUN_DIR/recipe.yaml (resolved), metrics.jsonl, logs/, checkpoints/, samples.jsonl,
    summary.json. If RUN_DIR already holds a run, it resumes from the newest committed
    checkpoint. SIGTERM, SIGINT or SIGUSR1 checkpoint and stop: exit code 75 (preempted).

    Example: launcher run recipes/examples/tiny-sft.yaml train.max_steps=50 --run-dir runs/try1
    """
    from launcher.recipe import load_recipe

    r = load_recipe(recipe, overrides or [])
    run_and_report(r, run_dir, ray_address=ray_address, as_json=as_json, resume=resume, recipe_path=recipe)


def plot(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with metrics.jsonl.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", help="PNG path (default: RUN_DIR/loss.png).")] = None,
) -> None:
    """Plot the training (and eval) loss curves of a run to a PNG.

    Example: launcher plot runs/tiny-sft-demo
    """
    from launcher.plot import plot_losses

    path = plot_losses(run_dir, out or run_dir / "loss.png")
    console.print(f"wrote {path}", highlight=False, markup=False)
