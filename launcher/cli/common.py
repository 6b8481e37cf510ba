"""What the verb modules share: the console, the overrides argument and the run-and-report flow
of `run` and `resume`. No verb module imports the root app (launcher.cli.app builds it from them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

# soft_wrap: a printed command or path stays on one line, so it can be copied and pasted whole.
console = Console(soft_wrap=True)

Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="key=value overrides applied last, e.g. train.max_steps=100", show_default=False),
]


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
