"""`launcher resume` and `launcher ckpt list|verify` (`export` lives in ckpt_export_cmd)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from launcher.cli.common import Overrides, console, run_and_report
from launcher.errors import UserError


RunDir = Annotated[Path, typer.Argument(help="A run directory.", show_default=False)]


def _need_run_dir(run_dir: Path) -> None:
    if not (run_dir / "recipe.yaml").exists() and not (run_dir / "checkpoints").is_dir():
        raise UserError(f"{run_dir}: not a run directory (no recipe.yaml or checkpoints/)")


def last_step(run_dir: Path) -> int | None:
    """The last optimizer step the run reached: summary.json's `steps`, or the newest step in
    metrics.jsonl (a run that crashed or was killed has no summary, and may have gone on past its
    newest checkpoint)."""
    from launcher.runtime.metrics import METRICS_FILE, read_metrics

    steps = [m["step"] for m in read_metrics(run_dir / METRICS_FILE) if isinstance(m.get("step"), int)]
    finished = _finished_at(run_dir)
    return max([*steps, *([finished] if finished is not None else [])], default=None)


SUMMARY_FILE = "summary.json"
"""train_loop.SUMMARY_FILE, written when training ends (importing train_loop loads torch)."""


def _finished_at(run_dir: Path) -> int | None:
    """The step a finished run ended at (summary.json), None while it has not finished."""
    try:
        return int(json.loads((run_dir / SUMMARY_FILE).read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def behind(run_dir: Path, step: int | None, newest: bool = True) -> tuple[int | None, str | None]:
    """The run's last step, and a sentence when checkpoint `step` holds fewer steps than the run
    trained: a crash, a kill or a run without `checkpoint.at_end` leaves steps in no checkpoint.
    `newest`: `step` is the newest committed checkpoint (else one chosen with --step)."""
    last = last_step(run_dir)
    if last is None or step is None or step >= last:
        return last, None
    if not newest:
        return last, (
            f"step {step} is exported; the run went on to step {last}: {last - step} steps are not in it"
        )
    return last, (
        f"the newest checkpoint is step {step}; the run went on to step {last}: {last - step} steps "
        "are not in any checkpoint"
    )


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
    preempted again. A run that finished, with nothing left to train (raise train.max_steps to go
    on), says so and exits 0.

    Example: launcher resume runs/tiny-sft-demo train.max_steps=600
    """
    from launcher.checkpoint.layout import latest_committed
    from launcher.recipe import load_recipe

    _need_run_dir(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml", overrides or [])
    latest = latest_committed(run_dir)
    if latest is not None:
        from launcher.checkpoint.manifest import read_manifest
        from launcher.checkpoint.preflight import check_same_recipe

        # a breaking override is refused, finished run or not (the manifest only: no data read)
        check_same_recipe(latest, read_manifest(latest.path), recipe)
    # more epochs: the new end is known only once the data is built, so the run goes on
    more_epochs = any(o.removeprefix("+").startswith("train.epochs=") for o in overrides or [])
    newest = latest.step if latest else None
    done = None if more_epochs else _nothing_to_resume(run_dir, recipe.train.max_steps, newest)
    if done is not None:
        if as_json:
            print(json.dumps({"run_dir": str(run_dir), "finished": True, "steps": _finished_at(run_dir),
                              "message": done}))
        else:
            console.print(done, highlight=False, markup=False)
        return
    if latest is None:
        raise UserError(f"{run_dir}: no committed checkpoint to resume from (`launcher ckpt list {run_dir}`)")
    run_and_report(recipe, run_dir, ray_address=ray_address, as_json=as_json, resume=True)


def _nothing_to_resume(run_dir: Path, max_steps: int | None, newest: int | None) -> str | None:
    """Why a finished run has nothing to resume (None: it has). A finished run is resumed only
    to train further (`train.max_steps` above where it ended) or to redo steps its newest
    checkpoint lacks; without a checkpoint it cannot be continued at all (UserError)."""
    ended = _finished_at(run_dir)
    if ended is None:
        return None  # stopped early (preempted, killed): the checkpoint is where it goes on
    target = max_steps if max_steps is not None else ended  # epochs: the end it reached
    if newest is not None and newest < target:
        return None
    further = f"launcher resume {run_dir} train.max_steps=M with M > {max(target, ended)}"
    if newest is None:
        if target > ended:
            raise UserError(
                f"{run_dir}: the run finished at step {ended} and saved no checkpoint, so it cannot go on "
                f"to step {target}: train again with checkpoint.at_end=true (or checkpoint.every_steps)"
            )
        return (f"{run_dir} already finished at step {ended} ({SUMMARY_FILE}) and saved no checkpoint: "
                "nothing to resume (to go on from the end next time, train with checkpoint.at_end=true)")
    return (f"{run_dir} already finished at step {ended} ({SUMMARY_FILE}); its newest checkpoint is step "
            f"{newest}: nothing to resume. To train further: {further}")


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return str(path.relative_to(run_dir))
    except ValueError:  # a checkpoint directory outside the run directory (a bucket mount)
        return str(path)


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
    last, gap = behind(run_dir, latest.step if latest else None)
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
            "run_last_step": last,
            "steps_after": None if last is None else max(0, last - s.step),
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"{run_dir}: no checkpoints" + (f" (the run reached step {last})" if last else ""),
                      highlight=False, markup=False)
        return
    # Paths relative to the run directory (named in the title) stay short enough to show whole;
    # a long absolute path used to be cut to "…" in a narrow terminal.
    table = Table(title=Text(f"checkpoints of {run_dir}"), title_justify="left")
    for col in ("", "step", "size", "state", "age"):
        table.add_column(col, no_wrap=True)
    table.add_column("path", overflow="fold")
    for r in rows:
        table.add_row("*" if r["resume_from"] else "", str(r["step"]), _size(r["bytes"]),
                      "committed" if r["committed"] else ("[red]incomplete[/]" if r["incomplete"] else "[yellow]uncommitted[/]"),
                      _age(r["mtime"]), Text(_relative(Path(r["path"]), run_dir)))
    # A pipe or a file gets the whole table instead of an 80-column squeeze.
    (console if console.is_terminal else Console(width=200, soft_wrap=True)).print(table)
    if gap:
        console.print(Text(f"note: {gap}", style="yellow"))


def ckpt_verify(
    run_dir: RunDir,
    step: Annotated[Optional[int], typer.Option("--step", help="Verify this step (default: every committed one).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check every file of committed checkpoints against its manifest (size and checksum).

    Reads bytes only, several files at once: nothing is unpickled. Exit code 1 if a file is
    missing, truncated or corrupted, naming it. Resume checks sizes only; this is the full check.

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
