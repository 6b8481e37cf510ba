"""Submit a run to Slurm, follow it across requeues, cancel it. Every scheduler command goes
through `launcher.backends.exec`.

What a run's state is made of: Slurm's own view (`squeue`, then `sacct` where accounting is
enabled) and the events the job script appends to `<run_dir>/slurm/events.jsonl` (start, Ray
ready, signal, exit code, requeue), which outlive Slurm's memory of the job.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.backends import exec as sh
from launcher.backends.profile import ClusterProfile
from launcher.backends.slurm.render import (
    CANCEL_FILE,
    EVENTS_FILE,
    OUTPUT_FILE,
    RECIPE_FILE,
    SCRIPT_FILE,
    SLURM_SUBDIR,
    SbatchJob,
    render_sbatch,
)
from launcher.errors import EXIT_PREEMPTED, UserError
from launcher.recipe.load import to_yaml
from launcher.recipe.sections import Recipe
from launcher.runs.registry import TERMINAL, Registry, RunRecord, latest_checkpoint, new_run_id

# Slurm job states (squeue %T / sacct State) -> registry statuses.
_STATES = {
    "PENDING": "pending", "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running",
    "SUSPENDED": "running", "STOPPED": "running", "RESIZING": "running", "SIGNALING": "running",
    "STAGE_OUT": "running", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
    "RESV_DEL_HOLD": "pending", "COMPLETED": "completed", "FAILED": "failed", "NODE_FAIL": "failed",
    "BOOT_FAIL": "failed", "OUT_OF_MEMORY": "failed", "DEADLINE": "failed", "CANCELLED": "cancelled",
    "REVOKED": "cancelled", "TIMEOUT": "timeout", "PREEMPTED": "preempted", "SPECIAL_EXIT": "failed",
}


@dataclass
class Submission:
    run_id: str
    run_dir: Path
    job: SbatchJob
    command: list[str]
    job_id: str | None = None


def plan(
    recipe: Recipe,
    profile: ClusterProfile,
    *,
    run_dir: str | Path | None = None,
    run_id: str | None = None,
    python: str | None = None,
    workdir: str | Path | None = None,
) -> Submission:
    """Everything `submit` would do, without touching the filesystem or the scheduler."""
    run_id = run_id or new_run_id(recipe.name)
    out = Path(run_dir) if run_dir else Path(os.path.expanduser(profile.runs_root)) / run_id
    out = out.absolute()
    job = render_sbatch(
        recipe,
        profile,
        str(out),
        run_id=run_id,
        python=python or profile.python or sys.executable,
        workdir=str(Path(workdir or os.getcwd()).absolute()),
    )
    return Submission(run_id, out, job, job.command(str(out / SLURM_SUBDIR / SCRIPT_FILE)))


def submit(
    sub: Submission,
    recipe: Recipe,
    profile: ClusterProfile,
    registry: Registry,
    *,
    recipe_path: str | None = None,
    cluster_path: str | None = None,
) -> Submission:
    """Write the run directory (resolved recipe, script), sbatch the script, record the run."""
    from launcher.runtime.job import check_run_dir

    check_run_dir(sub.run_dir)
    check_secrets_file(profile)
    if (sub.run_dir / SLURM_SUBDIR / SCRIPT_FILE).exists():
        raise UserError(f"{sub.run_dir} was already submitted: choose another --run-dir")
    slurm_dir = sub.run_dir / SLURM_SUBDIR
    try:
        slurm_dir.mkdir(parents=True, exist_ok=True)
        (slurm_dir / RECIPE_FILE).write_text(to_yaml(recipe))
        script = slurm_dir / SCRIPT_FILE
        script.write_text(sub.job.script)
        script.chmod(0o755)
    except OSError as e:
        raise UserError(f"cannot write the run directory {sub.run_dir}: {e.strerror}") from None
    res = sh.check(sub.command)
    sub.job_id = res.stdout.strip().split(";")[0]
    if not sub.job_id.isdigit():
        raise UserError(f"sbatch answered {res.stdout.strip()!r} instead of a job id")
    r = recipe.resources
    now = time.time()
    registry.add(
        RunRecord(
            run_id=sub.run_id,
            name=recipe.name,
            backend="slurm",
            run_dir=str(sub.run_dir),
            status="pending",
            recipe=recipe_path,
            cluster=cluster_path,
            job_ids=[sub.job_id],
            submitted_at=now,
            nodes=r.nodes,
            gpus_per_node=r.gpus_per_node,
            usd_per_gpu_hour=profile.usd_per_gpu_hour,
        ),
        detail=f"submitted as Slurm job {sub.job_id}",
    )
    return sub


def check_secrets_file(profile: ClusterProfile) -> None:
    """The profile's secrets_file exists and only its owner can read it."""
    if not profile.secrets_file:
        return
    path = Path(os.path.expanduser(profile.secrets_file))
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise UserError(f"secrets_file {path}: {e.strerror}; create it with NAME=value lines, mode 600") from None
    if mode & 0o077:
        raise UserError(f"secrets_file {path}: readable by others; run `chmod 600 {path}`")


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / SLURM_SUBDIR / EVENTS_FILE
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written
    return out


def slurm_state(job_id: str) -> tuple[str | None, str | None]:
    """(state, reason) of a job from squeue, else sacct; (None, None) when Slurm forgot it."""
    res = sh.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r"], timeout=30)
    if res.ok and res.stdout.strip():
        state, _, reason = res.stdout.strip().splitlines()[0].partition("|")
        return state.strip(), (reason.strip() if reason.strip() not in ("None", "") else None)
    res = sh.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State"], timeout=30)
    if res.ok and res.stdout.strip():
        state = res.stdout.strip().splitlines()[-1].split()[0]  # "CANCELLED by 0" -> CANCELLED
        return state, None
    return None, None


def _segments(events: list[dict[str, Any]], now: float, running: bool) -> float:
    """Seconds the job held its nodes, summed over its allocations (restarts)."""
    total, start = 0.0, None
    for e in events:
        if e.get("event") == "start":
            start = e["time"]
        elif e.get("event") == "exit" and start is not None:
            total += e["time"] - start
            start = None
    if start is not None and running:
        total += now - start
    return total


def refresh(run: RunRecord, registry: Registry) -> RunRecord:
    """Bring a Slurm run's row up to date; runs that have ended are left as they are."""
    if run.backend != "slurm" or run.status in TERMINAL or not run.job_ids:
        return run
    job_id = run.job_ids[-1]
    state, reason = slurm_state(job_id)
    events = read_events(run.run_dir)
    exits = [e for e in events if e.get("event") == "exit"]
    starts = [e for e in events if e.get("event") == "start"]
    cancel_requested = (Path(run.run_dir) / SLURM_SUBDIR / CANCEL_FILE).exists()
    if state is not None:
        status = _STATES.get(state.split("+")[0], "running")
        detail = f"Slurm {state}" + (f" ({reason})" if reason else "")
    elif exits:
        code = exits[-1].get("code")
        status = "completed" if code == 0 else ("preempted" if code == EXIT_PREEMPTED else "failed")
        detail = f"job script exited with {code}"
    else:
        status, detail = run.status, "Slurm no longer knows the job and it left no exit event"
    if status == "pending" and starts:
        detail = f"requeued, waiting to restart ({detail})"
    if status in ("cancelled", "failed") and cancel_requested:
        status = "cancelled"
    now = time.time()
    changes: dict[str, Any] = {
        "status": status,
        "detail": detail,
        "restarts": max([int(e.get("restart", 0)) for e in starts] + [run.restarts]),
        "latest_checkpoint": latest_checkpoint(run.run_dir) or run.latest_checkpoint,
    }
    if starts:
        changes["started_at"] = starts[0]["time"]
    held_s = _segments(events, now, status == "running")
    changes["gpu_hours"] = held_s / 3600 * run.nodes * run.gpus_per_node
    if run.usd_per_gpu_hour is not None:
        changes["usd"] = changes["gpu_hours"] * run.usd_per_gpu_hour
    if status in TERMINAL:
        changes["ended_at"] = exits[-1]["time"] if exits else now
        if exits:
            changes["exit_code"] = exits[-1].get("code")
    return registry.update(run.run_id, **changes)


def cancel(run: RunRecord, registry: Registry) -> RunRecord:
    """Mark the run as cancelled in its directory (so a checkpointing job does not requeue
    itself), then `scancel` its job."""
    slurm_dir = Path(run.run_dir) / SLURM_SUBDIR
    try:
        slurm_dir.mkdir(parents=True, exist_ok=True)
        (slurm_dir / CANCEL_FILE).write_text(f"{time.time()}\n")
    except OSError as e:
        raise UserError(f"cannot write {slurm_dir / CANCEL_FILE}: {e.strerror}") from None
    for job_id in run.job_ids[-1:]:
        sh.check(["scancel", job_id])
    return registry.update(run.run_id, status="cancelled", detail="cancelled by launcher cancel", ended_at=time.time())


def output_file(run: RunRecord) -> Path:
    return Path(run.run_dir) / SLURM_SUBDIR / OUTPUT_FILE
