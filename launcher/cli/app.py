"""Verbs of the `launcher` command. Each has an example in its help."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from launcher.errors import UserError

app = typer.Typer(
    name="launcher",
    help="Distributed training for Hugging Face models: recipes in, checkpoints out.\n\n"
    "Example: launcher run recipes/examples/tiny-sft.yaml train.max_steps=50",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
recipes_app = typer.Typer(help="Validate, show and document recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

# soft_wrap: a printed command or path stays on one line, so it can be copied and pasted whole.
console = Console(soft_wrap=True)

Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="key=value overrides applied last, e.g. train.max_steps=100", show_default=False),
]


def _version(value: bool) -> None:
    if value:
        from launcher import __version__

        console.print(f"launcher {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


@app.command()
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


def run_and_report(
    r, run_dir: Optional[Path], *, ray_address: Optional[str], as_json: bool, resume: bool,
    recipe_path: Optional[Path] = None,
) -> None:
    """Shared by `run` and `resume`: train (recorded in the run registry), then print the
    summary, or exit 75 if preempted."""
    from launcher.runs import track_local_run
    from launcher.runtime.job import default_run_dir

    out_dir = run_dir or default_run_dir(r)
    with track_local_run(r, out_dir, recipe_path=recipe_path):
        _run_and_report(r, out_dir, ray_address=ray_address, as_json=as_json, resume=resume)


def _run_and_report(r, out_dir: Path, *, ray_address: Optional[str], as_json: bool, resume: bool) -> None:
    from launcher.cli.progress import training_progress
    from launcher.errors import EXIT_PREEMPTED
    from launcher.runtime.driver import WorkerFailed
    from launcher.runtime.job import run_job

    out = Console(stderr=True, soft_wrap=True) if as_json else console
    out.print(f"run [bold]{escape(r.name)}[/] -> {escape(str(out_dir))}", highlight=False)
    oversubscribed = _oversubscribed(r, ray_address)
    if oversubscribed:
        out.print(Text(f"warning: {oversubscribed}", style="yellow"), highlight=False)
    try:
        result = run_job(
            r, out_dir, ray_address=ray_address, progress=lambda d: training_progress(d, out),
            resume=resume, notify=lambda m: out.print(m, highlight=False, markup=False),
        )
    except KeyboardInterrupt:
        # Only before Ray starts (reading the data, checking the model): the workers' phase
        # turns Ctrl-C into a checkpoint and exit 75 instead. Nothing was trained yet.
        out.print(Text("interrupted before training started: nothing was trained or saved", style="yellow"),
                  highlight=False)
        raise typer.Exit(130) from None
    except WorkerFailed as e:
        out.print(Text(str(e), style="bold red"), highlight=False)
        logs = sorted((out_dir / "logs").glob("rank-*.log"))
        for log in logs[:1]:
            tail = log.read_text(errors="replace").splitlines()[-25:]
            out.print(Text(f"--- last lines of {log} ---", style="dim"), highlight=False)
            out.print("\n".join(tail), markup=False, highlight=False)
        raise typer.Exit(1)
    if result.preempted is not None:
        p = result.preempted
        if as_json:
            print(json.dumps({"run_dir": str(out_dir), "preempted": p}))
        out.print(f"[bold yellow]preempted[/] after step {p['step']}: {escape(_stop_outcome(p))}. "
                  f"Resume: launcher resume {escape(str(out_dir))}", highlight=False)
        raise typer.Exit(EXIT_PREEMPTED)
    if as_json:
        print(json.dumps({"run_dir": str(out_dir), **result.summary, "first_loss": result.first_loss, "samples": result.samples}))
        return
    s = result.summary
    console.print(
        f"[bold green]done[/] {s['steps']} steps, {s['tokens']:,} tokens in {s['elapsed_s']:.1f}s; "
        f"loss {result.first_loss:.4f} -> {s['final_loss']:.4f}"
        + (f", eval loss {s['eval_loss']:.4f}" if s.get("eval_loss") is not None else ""),
        highlight=False,
    )
    if result.samples:
        table = Table(title="generations", show_lines=False)
        has_expected = any("expected" in x for x in result.samples)
        table.add_column("prompt", overflow="fold")
        if has_expected:
            table.add_column("expected")
        table.add_column("generated")
        for x in result.samples:
            prompt = x["prompt"].strip().splitlines()
            cells = [" / ".join(p for p in prompt if p.strip())[-60:]]
            if has_expected:
                cells.append(x.get("expected", ""))
            cells.append(x["generated"])
            table.add_row(*(Text(c) for c in cells))  # generated text is not markup
        console.print(table)
    console.print(f"metrics: {out_dir / 'metrics.jsonl'}   plot: launcher plot {out_dir}", highlight=False, markup=False)


def _stop_outcome(p: dict) -> str:
    """What a stop left behind, from preempted.json."""
    if p.get("aborted"):
        return (f"stopped at once ({p.get('signal') or 'second signal'}); nothing was committed by this stop, "
                "the previous checkpoint stands")
    if p.get("committed"):
        return f"checkpoint {p['committed']} committed"
    return "no time to save; the previous checkpoint stands"


def _oversubscribed(r, ray_address: Optional[str]) -> Optional[str]:
    """CPU workers that ask for more cores than this machine has still run (Ray is told about the
    cores they ask for), but share the cores and run slower than fewer workers would: say so."""
    import os

    if r.resources.gpus_per_node or ray_address or os.environ.get("RAY_ADDRESS"):
        return None
    cores = os.cpu_count() or 1
    need = r.resources.cpu_workers * r.resources.cpus_per_worker
    if need <= cores:
        return None
    return (f"resources.cpu_workers={r.resources.cpu_workers} x cpus_per_worker={r.resources.cpus_per_worker} "
            f"asks for {need} cores but this machine has {cores}: the workers share them and train slower; "
            f"use resources.cpu_workers={max(1, cores // r.resources.cpus_per_worker)} or fewer")


@app.command()
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


@recipes_app.command("validate")
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


@recipes_app.command("show")
def recipes_show(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of YAML.")] = False,
) -> None:
    """Print the fully resolved recipe (defaults, inheritance and overrides applied).

    Example: launcher recipes show recipes/examples/tiny-sft.yaml train.lr=1e-3
    """
    from launcher.recipe import load_recipe, to_dict, to_yaml

    r = load_recipe(recipe, overrides or [])
    print(json.dumps(to_dict(r), indent=2) if as_json else to_yaml(r), end="" if not as_json else "\n")


@recipes_app.command("docs")
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


# Verb groups that live in their own modules register themselves on `app` when imported.
# One line each, so that parallel work on different verbs does not touch the same lines.
from launcher.cli import ckpt_cmds  # noqa: E402,F401  (ckpt list|verify|export, resume)
from launcher.cli import ckpt_export_cmd  # noqa: E402,F401  (ckpt export)
from launcher.cli import estimate_cmd  # noqa: E402,F401  (estimate)
from launcher.cli import backend_cmds  # noqa: E402,F401  (submit, status, logs, cancel)
