"""The driver's checks before resuming, so that a checkpoint that cannot be used is reported
with nothing launched: committed and intact, written by a compatible recipe, loadable into
this recipe's layout."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from launcher.checkpoint.layout import StepDir, latest_committed
from launcher.checkpoint.manifest import Problem, file_digest, read_manifest
from launcher.errors import UserError
from launcher.recipe.sections import Recipe


def layout_of(recipe: Recipe) -> dict[str, Any]:
    from launcher.runtime.driver import ray_plan

    world = ray_plan(recipe).num_workers
    stages = recipe.parallelism.pipeline_stages
    return {
        "world_size": world,
        "data_parallel": world // stages,
        "zero_stage": recipe.parallelism.zero_stage,
        "pipeline_stages": stages,
    }


def verify_parallel(step_dir: Path, workers: int = 4) -> list[Problem]:
    """`manifest.verify` with the files hashed on several threads (hashlib releases the GIL)."""
    doc = read_manifest(step_dir)
    problems: list[Problem] = []

    def check(item: tuple[str, dict[str, Any]]) -> Problem | None:
        rel, want = item
        path = step_dir / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return Problem(str(path), "missing")
        if size != want["size"]:
            return Problem(str(path), f"size {size} bytes, manifest says {want['size']} (truncated or rewritten)")
        if file_digest(path)["sha256"] != want["sha256"]:
            return Problem(str(path), "checksum does not match the manifest (corrupted)")
        return None

    with ThreadPoolExecutor(workers) as pool:
        problems = [p for p in pool.map(check, doc["files"].items()) if p]
    return problems


def check_resume(run_dir: Path, recipe: Recipe) -> StepDir | None:
    """The checkpoint training will resume from, after checking it; None if there is none."""
    from launcher.checkpoint.reshard import reshard_problem
    from launcher.checkpoint.state import fingerprint, fingerprint_diff

    step = latest_committed(run_dir)
    if step is None:
        return None
    manifest = read_manifest(step.path)
    diff = fingerprint_diff(manifest.get("fingerprint", {}), fingerprint(recipe))
    if diff:
        raise UserError(
            f"{step.path} was written by a different recipe; resuming would train another model or data:\n  "
            + "\n  ".join(diff)
            + "\nrevert these keys, or start over with --no-resume (the old run is kept aside)"
        )
    layout = layout_of(recipe)
    problem = reshard_problem(manifest, layout)
    if problem:
        raise UserError(f"{step.path}: cannot resume: {problem}")
    problems = verify_parallel(step.path)
    if problems:
        raise UserError(
            f"{step.path} is damaged: " + "; ".join(map(str, problems[:3]))
            + f"{' ...' if len(problems) > 3 else ''}. Remove that step directory to resume from the one before "
            "(`launcher ckpt list`), or start over with --no-resume"
        )
    return step
