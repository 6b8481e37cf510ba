"""Local runs (`launcher run`) in the registry."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from launcher.errors import EXIT_PREEMPTED
from launcher.recipe.sections import Recipe
from launcher.runs.registry import Registry, RunRecord, latest_checkpoint


def _exit_code(exc: BaseException) -> int | None:
    code = getattr(exc, "exit_code", None)  # click/typer Exit
    if code is None and isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code


@contextmanager
def track_local_run(
    recipe: Recipe, run_dir: str | Path, *, recipe_path: str | Path | None = None, registry: Registry | None = None
) -> Iterator[RunRecord | None]:
    """Record a foreground run: `running` on entry; `completed`, `preempted` (exit 75),
    `cancelled` (Ctrl-C) or `failed` on exit. A run directory already in the registry (a resumed
    run) keeps its row and counts a restart. The registry never breaks a run: if it cannot be
    written, a warning is printed and training goes on. Inside a cluster job (`LAUNCHER_BACKEND`
    set by the job script, e.g. `slurm`) nothing is recorded: the backend tracks the run."""
    run_dir = Path(run_dir).absolute()
    if os.environ.get("LAUNCHER_BACKEND", "local") != "local":
        yield None  # started by a cluster job: that backend's row tracks the run
        return
    try:
        reg = registry or Registry()
        run = _start(reg, recipe, run_dir, recipe_path)
    except Exception as e:  # noqa: BLE001 - bookkeeping must not stop training
        print(f"warning: run registry not updated: {e}", file=sys.stderr)
        yield None
        return
    status, code, detail = "completed", 0, None
    t0 = time.time()
    try:
        yield run
    except BaseException as e:
        code = _exit_code(e)
        if isinstance(e, KeyboardInterrupt):
            status, code = "cancelled", 130
        elif code == 0:
            status = "completed"
        elif code == EXIT_PREEMPTED:
            status = "preempted"
        else:
            status, detail = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            code = code if code is not None else 1
        raise
    finally:
        _end(reg, run, status, code, detail, t0)


def _start(reg: Registry, recipe: Recipe, run_dir: Path, recipe_path: str | Path | None) -> RunRecord:
    now = time.time()
    r = recipe.resources
    known = reg.by_run_dir(run_dir)
    if known and known.backend == "local":
        return reg.update(
            known.run_id, status="running", restarts=known.restarts + 1, ended_at=None, exit_code=None,
            detail="resumed",
        )
    run_id = run_dir.name
    if reg.get(run_id):
        from launcher.runs.registry import new_run_id

        run_id = new_run_id(recipe.name)
    return reg.add(
        RunRecord(
            run_id=run_id,
            name=recipe.name,
            backend="local",
            run_dir=str(run_dir),
            status="running",
            recipe=str(recipe_path) if recipe_path else None,
            submitted_at=now,
            started_at=now,
            nodes=r.nodes,
            gpus_per_node=r.gpus_per_node,
        )
    )


def _end(reg: Registry, run: RunRecord, status: str, code: int | None, detail: str | None, t0: float) -> None:
    try:
        now = time.time()
        segment_h = (now - t0) / 3600
        gpu_hours = run.gpu_hours + segment_h * run.nodes * run.gpus_per_node
        reg.update(
            run.run_id,
            status=status,
            exit_code=code,
            ended_at=now,
            detail=detail,
            gpu_hours=gpu_hours,
            latest_checkpoint=latest_checkpoint(run.run_dir),
        )
    except Exception as e:  # noqa: BLE001
        print(f"warning: run registry not updated: {e}", file=sys.stderr)
