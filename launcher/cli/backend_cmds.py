"""`launcher submit`, `launcher status`, `launcher logs`, `launcher cancel`: runs on a cluster
backend (Slurm, SkyPilot) and the run registry shared with local runs."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from launcher.cli.common import Overrides, console
from launcher.errors import UserError

def submit(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    overrides: Overrides = None,
    cluster: Annotated[
        Path, typer.Option("--cluster", help="Cluster profile YAML, e.g. cluster/example-slurm.yaml or cluster/example-skypilot.yaml.", show_default=False)
    ] = ...,  # type: ignore[assignment]
    run_dir: Annotated[
        Optional[Path],
        typer.Option("--run-dir", help="Run directory: on the shared filesystem for Slurm (default: <runs_root>/<run-id>); the local record for SkyPilot (default: runs/<run-id>)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the job script and the estimate; submit nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Submit even when the estimate says it does not fit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Submit a recipe to a cluster (Slurm, or cloud GPUs through SkyPilot): N nodes, Ray across them, preemption-safe.

    The job checkpoints on Slurm's warning signal, requeues itself and resumes from its latest
    committed checkpoint. Secrets (HF_TOKEN, WANDB_API_KEY, ...) pass through your environment.

    Example: launcher submit recipes/sft/llama-3.1-70b-full-sft.yaml --cluster cluster/example-slurm.yaml --dry-run
    """
    from launcher.backends.profile import load_profile
    from launcher.backends.slurm import submit as slurm
    from launcher.recipe import load_recipe
    from launcher.runs import Registry

    from launcher.pretrained import warn_for_submit

    r = load_recipe(recipe, overrides or [])
    profile = load_profile(cluster)
    warn_for_submit(r)  # the model and tokenizer resolve (exit 2 if surely not), before anything is made
    if profile.backend == "skypilot":
        _submit_skypilot(r, profile, recipe, cluster, run_dir, dry_run=dry_run, force=force, as_json=as_json)
        return
    sub = slurm.plan(r, profile, run_dir=run_dir)
    est, est_text = _estimate_safe(r, profile, cluster)
    out = console if not as_json else None
    if dry_run:
        if as_json:
            print(json.dumps({
                "run_id": sub.run_id, "run_dir": str(sub.run_dir), "command": sub.command,
                "script": sub.job.script, "estimate": est.to_json() if est is not None else None,
            }, indent=2))
        else:
            print(f"# run {sub.run_id} -> {sub.run_dir}")
            print(f"# {shlex.join(sub.command)}")
            print(sub.job.script, end="")
            print(est_text)
        return
    _refuse_unless_fits(est, est_text, force, "the cluster's nodes")
    registry = Registry()
    slurm.submit(sub, r, profile, registry, recipe_path=str(recipe), cluster_path=str(cluster))
    if as_json:
        print(json.dumps({"run_id": sub.run_id, "run_dir": str(sub.run_dir), "job_id": sub.job_id,
                          "estimate": est.to_json() if est is not None else None}))
        return
    assert out is not None
    out.print(est_text, highlight=False, markup=False)
    out.print(f"submitted [bold]{escape(sub.run_id)}[/] as Slurm job {sub.job_id}", highlight=False)
    out.print(f"run dir: {sub.run_dir}\nfollow:  launcher status {sub.run_id}  |  launcher logs {sub.run_id} -f",
              highlight=False, markup=False)


def _refuse_unless_fits(est: Any, est_text: str, force: bool, where: str) -> None:
    if est is not None and est.fits is False and not force:
        print(est_text, file=sys.stderr)
        raise UserError(f"the estimate says this recipe does not fit {where}: fix the recipe, or --force")


def _submit_skypilot(r: Any, profile: Any, recipe: Path, cluster: Path, run_dir: Path | None, *, dry_run: bool,
                     force: bool, as_json: bool) -> None:
    from launcher.backends.skypilot import launch as sky_launch
    from launcher.runs import Registry

    sub = sky_launch.plan(r, profile, run_dir=run_dir)
    _warn_missing_secrets(sky_launch.missing_secrets(profile))
    est, est_text = _estimate_safe(r, profile, cluster)
    if dry_run:
        if as_json:
            print(json.dumps({
                "run_id": sub.run_id, "run_dir": str(sub.local_dir), "launch": sub.verb, "task": sub.task.config,
                "estimate": est.to_json() if est is not None else None,
            }, indent=2))
        else:
            print(f"# run {sub.run_id} -> {sub.local_dir}")
            print(f"# {sub.verb}; secrets from your environment: {', '.join(sub.task.secret_names)}")
            print(sub.task.yaml, end="")
            print(est_text)
        return
    _refuse_unless_fits(est, est_text, force, "the profile's GPUs")
    sky_launch.submit(sub, r, profile, Registry(), recipe_path=str(recipe), cluster_path=str(cluster))
    if as_json:
        print(json.dumps({"run_id": sub.run_id, "run_dir": str(sub.local_dir), "job_id": sub.job_id,
                          "managed": sub.managed, "cluster": sub.cluster,
                          "estimate": est.to_json() if est is not None else None}))
        return
    console.print(est_text, highlight=False, markup=False)
    what = f"managed job {sub.job_id}" if sub.managed else f"job {sub.job_id} on cluster {sub.cluster}"
    console.print(f"submitted [bold]{escape(sub.run_id)}[/] as SkyPilot {escape(what)}", highlight=False)
    console.print(f"run dir: {sub.local_dir}\nfollow:  launcher status {sub.run_id}  |  launcher logs {sub.run_id} -f",
                  highlight=False, markup=False)


def _warn_missing_secrets(names: list[str]) -> None:
    """A secret the profile names but the environment lacks is not passed: say so, on stderr
    (stdout may be --json), instead of letting the job fail later on a gated model or W&B login."""
    if names:
        print(f"warning: {', '.join(names)} named under `secrets` in the cluster profile but not set in "
              "this environment: the job runs without them (export them here to pass them)", file=sys.stderr)


def _estimate_safe(recipe: Any, profile: Any, cluster: Path) -> tuple[Any, str]:
    try:
        from launcher.estimate import estimate_recipe, format_estimate
    except ImportError:
        return None, "estimate: unavailable (launcher.estimate is not part of this version yet)"
    r = recipe.resources
    if profile.backend == "skypilot":
        from launcher.backends.skypilot.launch import estimator_gpu
        from launcher.estimate.prices import instance_memory_gib

        gpu = r.gpu or estimator_gpu(profile)
        gpus = r.gpus_per_node or profile.gpus_per_node
        ram = profile.node_memory_gb or instance_memory_gib(gpu, gpus, profile.clouds)
        est = estimate_recipe(recipe, gpu=gpu, nodes=r.nodes, gpus_per_node=gpus, node_memory_gb=ram)
        if profile.clouds:  # the cost rows of the clouds the profile allows
            est.costs = [c for c in est.costs if c.cloud.lower() in profile.clouds]
        return est, format_estimate(est)
    est = estimate_recipe(
        recipe,
        gpu=r.gpu or profile.gpu,
        nodes=r.nodes,
        gpus_per_node=r.gpus_per_node or None,
        usd_per_gpu_hour=profile.usd_per_gpu_hour,
        onprem_name=cluster.stem,
        node_memory_gb=profile.host_memory_gib(),
    )
    return est, format_estimate(est)


def _refresh(run: Any, registry: Any) -> Any:
    """Ask the run's backend for news (local runs are kept up to date by their own process)."""
    if run.backend == "slurm":
        from launcher.backends.slurm.submit import refresh

        return refresh(run, registry)
    if run.backend == "skypilot":
        from launcher.backends.skypilot.launch import refresh as sky_refresh

        return sky_refresh(run, registry)
    return run


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _fmt_duration(run: Any) -> str:
    if not run.started_at:
        return "-"
    s = int((run.ended_at or time.time()) - run.started_at)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


_STYLE = {"completed": "green", "running": "cyan", "pending": "yellow", "preempted": "yellow",
          "failed": "red", "cancelled": "dim", "timeout": "red"}


def status(
    run_id: Annotated[Optional[str], typer.Argument(help="A run id (or unique prefix); all runs if omitted.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    limit: Annotated[int, typer.Option("--limit", help="Show at most this many runs.")] = 30,
) -> None:
    """Show runs (local and cluster) from the run registry, asking the scheduler for news.

    Example: launcher status    |    launcher status tiny-sft-20250101-120000-ab12 --json
    """
    from launcher.runs import Registry

    registry = Registry()
    runs = [registry.find(run_id)] if run_id else registry.list(limit)
    runs = [_refresh(r, registry) for r in runs]
    if as_json:
        items = []
        for r in runs:
            item = r.to_json()
            if run_id:
                item["history"] = registry.history(r.run_id)
            items.append(item)
        print(json.dumps(items[0] if run_id else items, indent=2))
        return
    if not runs:
        console.print(f"no runs recorded yet ({registry.path})", highlight=False, markup=False)
        return
    table = Table(show_lines=False)
    for col in ("run", "backend", "status", "job", "restarts", "checkpoint", "started", "time", "GPU-h", "$"):
        table.add_column(col, no_wrap=col in ("run", "started"))
    for r in runs:
        table.add_row(
            Text(r.run_id),
            r.backend,
            f"[{_STYLE.get(r.status, 'white')}]{r.status}[/]",
            ",".join(r.job_ids) or "-",
            str(r.restarts),
            Text(r.latest_checkpoint or "-"),
            _fmt_time(r.started_at or r.submitted_at),
            _fmt_duration(r),
            f"{r.gpu_hours:.2f}",
            f"{r.usd:.2f}" if r.usd is not None else "-",
        )
    # A pipe or a file gets the whole table instead of an 80-column squeeze.
    (console if console.is_terminal else Console(width=200)).print(table)
    if run_id:
        r = runs[0]
        console.print(f"run dir: {r.run_dir}", highlight=False, markup=False)
        if r.detail:
            console.print(f"detail:  {r.detail}", highlight=False, markup=False)
        for h in registry.history(r.run_id):
            console.print(f"  {_fmt_time(h['time'])}  {h['status']}" + (f"  ({h['detail']})" if h["detail"] else ""),
                          highlight=False, markup=False)


def logs(
    run_id: Annotated[str, typer.Argument(help="A run id (or unique prefix).", show_default=False)],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing as the log grows, until the run ends.")] = False,
) -> None:
    """Print the log of a run: the Slurm job's output (all restarts), or rank 0's log of a local run.

    Example: launcher logs tiny-sft-20250101-120000-ab12 -f
    """
    from launcher.backends.slurm.submit import output_file
    from launcher.runs import TERMINAL, Registry

    registry = Registry()
    run = registry.find(run_id)
    if run.backend == "skypilot":
        from launcher.backends.skypilot.launch import logs as sky_logs

        code = sky_logs(run, follow=follow)
        _refresh(run, registry)
        if code:
            raise typer.Exit(code if code < 126 else 1)
        return
    path = output_file(run) if run.backend == "slurm" else Path(run.run_dir) / "logs" / "rank-0.log"
    pos = 0
    while True:
        if path.exists():
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
                pos += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        elif not follow:
            raise UserError(f"{path}: no log yet (status: {run.status})")
        if not follow:
            return
        run = _refresh(run, registry)
        if run.status in TERMINAL:
            time.sleep(0.5)
            follow = False  # print what the last moment wrote, then stop
            continue
        time.sleep(2)


def cancel(
    run_id: Annotated[str, typer.Argument(help="A run id (or unique prefix).", show_default=False)],
) -> None:
    """Cancel a cluster run: it stops and does not requeue itself.

    Example: launcher cancel tiny-sft-20250101-120000-ab12
    """
    from launcher.backends.slurm.submit import cancel as slurm_cancel
    from launcher.runs import TERMINAL, Registry

    registry = Registry()
    run = registry.find(run_id)
    if run.backend not in ("slurm", "skypilot"):
        raise UserError(f"{run.run_id} is a {run.backend} run: stop it where it runs (Ctrl-C)")
    if run.status in TERMINAL:
        raise UserError(f"{run.run_id} already ended ({run.status})")
    if run.backend == "skypilot":
        from launcher.backends.skypilot.launch import cancel as sky_cancel

        run = sky_cancel(run, registry)
        console.print(f"cancelled {run.run_id} (SkyPilot job {run.job_ids[-1]})", highlight=False)
        return
    run = slurm_cancel(run, registry)
    console.print(f"cancelled {run.run_id} (Slurm job {','.join(run.job_ids)})", highlight=False)
