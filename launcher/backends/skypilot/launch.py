"""Submit a run to SkyPilot, follow it, cancel it. Every SkyPilot call goes through
`launcher.backends.skypilot.sdk.CLIENT`.

Spot profiles run as managed jobs (`sky.jobs.launch`): SkyPilot recovers preemptions and the
registry counts them (`recovery_count`). On-demand profiles run on one cluster (`sky.launch`,
torn down when the task ends). The registry records the SkyPilot job id (managed: `managed:<id>`;
on a cluster: `<cluster>:<id>`), the status, recoveries and spend (GPU-hours x price).
"""

from __future__ import annotations

import math
import os
import secrets as _secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.backends.skypilot import sdk
from launcher.backends.skypilot.profile import SkyPilotProfile
from launcher.backends.skypilot.render import (
    RAY_TOKEN_SECRET,
    RECIPE_FILE,
    SKY_SUBDIR,
    TASK_FILE,
    SkyTask,
    bucket_uri,
    cluster_name,
    render_task,
)
from launcher.errors import UserError
from launcher.recipe.load import env_variables, to_yaml
from launcher.recipe.sections import Recipe
from launcher.runs.registry import TERMINAL, Registry, RunRecord, new_run_id

DEFAULT_LOCAL_ROOT = "runs"
"""Where the submitting host keeps each SkyPilot run's record (`runs/<run-id>/skypilot/`)."""

# SkyPilot job states (managed and cluster jobs) -> registry statuses.
_STATES = {
    "PENDING": "pending", "SUBMITTED": "pending", "STARTING": "pending", "INIT": "pending",
    "SETTING_UP": "pending", "RUNNING": "running", "WINDING_DOWN": "running", "RECOVERING": "preempted",
    "CANCELLING": "cancelled", "CANCELLED": "cancelled", "SUCCEEDED": "completed", "FAILED": "failed",
    "FAILED_SETUP": "failed", "FAILED_PRECHECKS": "failed", "FAILED_NO_RESOURCE": "failed",
    "FAILED_CONTROLLER": "failed", "FAILED_DRIVER": "failed",
}

# The estimator's GPU names for SkyPilot's accelerator names.
_GPU_NAMES = {"H100": "H100-80GB", "H200": "H200-141GB", "A100-80GB": "A100-80GB", "A100": "A100-40GB",
              "L4": "L4-24GB", "A10G": "A10G-24GB", "V100": "V100-16GB", "V100-32GB": "V100-32GB"}


@dataclass
class Submission:
    run_id: str
    local_dir: Path
    """On the submitting host: `skypilot/task.yaml` and `skypilot/recipe.yaml` (no secrets)."""
    task: SkyTask
    managed: bool
    cluster: str | None
    job_id: str | None = None

    @property
    def verb(self) -> str:
        return "sky.jobs.launch (managed job: preemptions recovered)" if self.managed else f"sky.launch (cluster {self.cluster})"


def estimator_gpu(profile: SkyPilotProfile) -> str | None:
    return _GPU_NAMES.get(profile.accelerator)


def price_per_gpu_hour(profile: SkyPilotProfile) -> float | None:
    """The profile's price, else the cheapest in the shipped price table for the accelerator on
    the profile's clouds (spot or on-demand, as `use_spot`); None when the table has no offer."""
    if profile.usd_per_gpu_hour is not None:
        return profile.usd_per_gpu_hour
    from launcher.estimate.prices import load_prices

    gpu = estimator_gpu(profile)
    best = math.inf
    for o in load_prices().offers:
        if o.gpu != gpu or (profile.clouds and o.cloud.lower() not in profile.clouds):
            continue
        price = o.spot_usd_per_hour if profile.use_spot else o.usd_per_hour
        if price:
            best = min(best, price / o.gpus)
    return None if best == math.inf else best


def plan(
    recipe: Recipe,
    profile: SkyPilotProfile,
    *,
    run_dir: str | Path | None = None,
    run_id: str | None = None,
    workdir: str | Path | None = None,
    environ: dict[str, str] | None = None,
) -> Submission:
    """Everything `submit` would do, without touching the filesystem or SkyPilot. Secrets that
    the profile names and `environ` sets are listed (names only)."""
    run_id = run_id or new_run_id(recipe.name)
    env = os.environ if environ is None else environ
    local = Path(run_dir) if run_dir else Path(DEFAULT_LOCAL_ROOT) / run_id
    local = local.absolute()
    # The recipe's own ${oc.env:...} variables travel as secrets too: each node resolves them.
    names = [n for n in dict.fromkeys([*profile.secrets, *env_variables(recipe)]) if env.get(n)]
    task = render_task(
        recipe, profile, run_id=run_id, workdir=str(Path(workdir or os.getcwd()).absolute()),
        recipe_file=str(local / SKY_SUBDIR / RECIPE_FILE), secret_names=names,
    )
    return Submission(run_id, local, task, profile.use_spot, None if profile.use_spot else cluster_name(run_id))


def missing_secrets(profile: SkyPilotProfile, environ: dict[str, str] | None = None) -> list[str]:
    """Secrets the profile names that the environment does not set (they are not passed)."""
    env = os.environ if environ is None else environ
    return [n for n in profile.secrets if not env.get(n)]


def secret_values(sub: Submission, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The values of the task's secrets, from the environment, and a fresh Ray token."""
    env = os.environ if environ is None else environ
    values = {n: env[n] for n in sub.task.secret_names if n != RAY_TOKEN_SECRET and env.get(n)}
    values[RAY_TOKEN_SECRET] = _secrets.token_hex(32)
    return values


def submit(
    sub: Submission,
    recipe: Recipe,
    profile: SkyPilotProfile,
    registry: Registry,
    *,
    recipe_path: str | None = None,
    cluster_path: str | None = None,
    environ: dict[str, str] | None = None,
) -> Submission:
    """Write the local record (resolved recipe, task YAML), launch through the seam, record the run."""
    sky_dir = sub.local_dir / SKY_SUBDIR
    if (sky_dir / TASK_FILE).exists():
        raise UserError(f"{sub.local_dir} was already submitted: choose another --run-dir")
    try:
        sky_dir.mkdir(parents=True, exist_ok=True)
        (sky_dir / RECIPE_FILE).write_text(to_yaml(recipe))
        (sky_dir / TASK_FILE).write_text(sub.task.yaml)
    except OSError as e:
        raise UserError(f"cannot write the run directory {sub.local_dir}: {e.strerror}") from None
    values = secret_values(sub, environ)
    client = sdk.CLIENT
    if sub.managed:
        sub.job_id = client.jobs_launch(sub.task.config, values, name=sub.run_id)
        job = f"managed:{sub.job_id}"
    else:
        assert sub.cluster is not None
        sub.job_id = client.launch(sub.task.config, values, cluster_name=sub.cluster)
        job = f"{sub.cluster}:{sub.job_id}"
    r = recipe.resources
    registry.add(
        RunRecord(
            run_id=sub.run_id,
            name=recipe.name,
            backend="skypilot",
            run_dir=str(sub.local_dir),
            status="pending",
            recipe=recipe_path,
            cluster=cluster_path,
            job_ids=[job],
            submitted_at=time.time(),
            nodes=r.nodes,
            gpus_per_node=r.gpus_per_node,
            usd_per_gpu_hour=price_per_gpu_hour(profile),
            latest_checkpoint=None,
        ),
        detail=f"launched as {'managed job ' + sub.job_id if sub.managed else f'job {sub.job_id} on {sub.cluster}'}"
               f"; checkpoints in {bucket_uri(profile, sub.run_id)}",
    )
    return sub


def _job(run: RunRecord) -> tuple[str | None, str]:
    """(cluster or None for a managed job, job id) of a run's latest SkyPilot job."""
    where, _, job_id = run.job_ids[-1].rpartition(":")
    return (None if where == "managed" else where), job_id


def refresh(run: RunRecord, registry: Registry) -> RunRecord:
    """Bring a SkyPilot run's row up to date; runs that have ended are left as they are."""
    if run.backend != "skypilot" or run.status in TERMINAL or not run.job_ids:
        return run
    cluster, job_id = _job(run)
    client = sdk.CLIENT
    info = client.managed_job_status(job_id) if cluster is None else client.job_status(cluster, job_id)
    now = time.time()
    if info is None:
        return registry.update(run.run_id, detail="SkyPilot no longer knows the job (cluster gone)")
    state = info.get("status") or ""
    status = _STATES.get(state, "running")
    changes: dict[str, Any] = {"status": status, "detail": f"SkyPilot {state}"}
    if cluster is None:
        changes["restarts"] = max(int(info.get("recovery_count") or 0), run.restarts)
        if status == "preempted":
            changes["detail"] = f"SkyPilot RECOVERING (recovery {changes['restarts'] + 1}): new instances, then resume"
    if info.get("started_at"):
        changes["started_at"] = float(info["started_at"])
    if info.get("duration_s") is not None:
        held_s = float(info["duration_s"])
    elif info.get("started_at"):
        held_s = float(info.get("ended_at") or now) - float(info["started_at"])
    else:
        held_s = 0.0
    changes["gpu_hours"] = max(held_s, 0.0) / 3600 * run.nodes * run.gpus_per_node
    if run.usd_per_gpu_hour is not None:
        changes["usd"] = changes["gpu_hours"] * run.usd_per_gpu_hour
    if status in TERMINAL:
        changes["ended_at"] = float(info.get("ended_at") or now)
    return registry.update(run.run_id, **changes)


def cancel(run: RunRecord, registry: Registry) -> RunRecord:
    cluster, job_id = _job(run)
    if cluster is None:
        sdk.CLIENT.jobs_cancel(job_id)
    else:
        sdk.CLIENT.cancel(cluster, job_id)
    return registry.update(run.run_id, status="cancelled", detail="cancelled by launcher cancel", ended_at=time.time())


def logs(run: RunRecord, *, follow: bool) -> int:
    cluster, job_id = _job(run)
    return sdk.CLIENT.tail_logs(cluster, job_id, follow=follow)
