"""`launcher resume` and `launcher ckpt list|verify` (`export` lives in ckpt_export_cmd)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from launcher.cli.app import Overrides, app, console, run_and_report
from launcher.errors import UserError

ckpt_app = typer.Typer(help="List, verify and export checkpoints of a run.", no_args_is_help=True)
app.add_typer(ckpt_app, name="ckpt")

RunDir = Annotated[Path, typer.Argument(help="A run directory.", show_default=False)]


def _need_run_dir(run_dir: Path) -> None:
    if not (run_dir / "recipe.yaml").exists() and not (run_dir / "checkpoints").is_dir():
        raise UserError(f"{run_dir}: not a run directory (no recipe.yaml or checkpoints/)")


@app.command()
def resume(
    run_dir: RunDir,
    overrides: Overrides = None,
    ray_address: Annotated[
        Optional[str], typer.Option("--ray-address", help="Join this Ray cluster (or set RAY_ADDRESS).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Continue a run from its newest committed checkpoint, with the recipe it recorded.

    Overrides may change harmless keys (train.max_steps, logging, checkpoint interval, the
    number of workers); a change to the model, tokenizer or data is refused. Exit code 75 if
    preempted again.

    Example: launcher resume runs/tiny-sft-demo train.max_steps=600
    """
    from launcher.checkpoint.layout import latest_committed
    from launcher.recipe import load_recipe

    _need_run_dir(run_dir)
    if latest_committed(run_dir) is None:
        raise UserError(f"{run_dir}: no committed checkpoint to resume from (`launcher ckpt list {run_dir}`)")
    recipe = load_recipe(run_dir / "recipe.yaml", overrides or [])
    run_and_report(recipe, run_dir, ray_address=ray_address, as_json=as_json, resume=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _age(t: float) -> str:
    s = max(0, time.time() - t)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= span:
            return f"{s / span:.0f}{unit} ago"
    return f"{s:.0f}s ago"


@ckpt_app.command("list")
def ckpt_list(
    run_dir: RunDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Checkpoints of a run: step, size, committed or not, age; `*` marks the one a resume uses.

    Example: launcher ckpt list runs/tiny-sft-demo
    """
    from launcher.checkpoint.layout import latest_committed, list_step_dirs

    _need_run_dir(run_dir)
    latest = latest_committed(run_dir)
    rows = []
    for s in list_step_dirs(run_dir):
        files = [p for p in s.path.rglob("*") if p.is_file()]
        rows.append({
            "step": s.step,
            "path": str(s.path),
            "committed": s.committed,
            "incomplete": s.problem,
            "resume_from": latest is not None and s.path == latest.path,
            "bytes": sum(p.stat().st_size for p in files),
            "mtime": max((p.stat().st_mtime for p in files), default=s.path.stat().st_mtime),
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"{run_dir}: no checkpoints", highlight=False)
        return
    table = Table()
    for col in ("", "step", "size", "state", "age", "path"):
        table.add_column(col)
    for r in rows:
        table.add_row("*" if r["resume_from"] else "", str(r["step"]), _size(r["bytes"]),
                      "committed" if r["committed"] else ("[red]incomplete[/]" if r["incomplete"] else "[yellow]uncommitted[/]"),
                      _age(r["mtime"]), r["path"])
    console.print(table)


@ckpt_app.command("verify")
def ckpt_verify(
    run_dir: RunDir,
    step: Annotated[Optional[int], typer.Option("--step", help="Verify this step (default: every committed one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check every file of committed checkpoints against its manifest (size and sha256).

    Reads bytes only: nothing is unpickled. Exit code 1 if a file is missing, truncated or
    corrupted, naming it.

    Example: launcher ckpt verify runs/tiny-sft-demo --step 200
    """
    from launcher.checkpoint.layout import checkpoints_dir, list_step_dirs, step_tag
    from launcher.checkpoint.manifest import verify

    _need_run_dir(run_dir)
    if step is not None:
        path = checkpoints_dir(run_dir) / step_tag(step)
        if not path.is_dir():
            raise UserError(f"{path}: no such checkpoint (`launcher ckpt list {run_dir}`)")
        targets = [path]
    else:
        # with those whose manifest lists a missing or short file: a resume skips them, say why
        targets = [s.path for s in list_step_dirs(run_dir) if s.committed or s.problem]
        if not targets:
            raise UserError(f"{run_dir}: no committed checkpoints to verify")
    results = []
    for path in targets:
        problems = verify(path, workers=4)
        results.append({"path": str(path), "ok": not problems, "problems": [str(p) for p in problems]})
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            mark = "[green]ok[/]  " if r["ok"] else "[red]bad[/] "
            console.print(mark + r["path"], highlight=False)
            for p in r["problems"]:
                console.print(f"      {p}", highlight=False)
    if not all(r["ok"] for r in results):
        raise typer.Exit(1)
