"""The driver's checks before resuming, so that a checkpoint that cannot be used is reported
with nothing launched: committed and intact, written by a compatible recipe, loadable into
this recipe's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.checkpoint.layout import StepDir, latest_committed
from launcher.checkpoint.manifest import read_manifest, verify
from launcher.errors import UserError
from launcher.recipe.sections import Recipe


def layout_of(recipe: Recipe) -> dict[str, Any]:
    from launcher.checkpoint.reshard import layout
    from launcher.runtime.driver import ray_plan

    return layout(recipe, ray_plan(recipe).num_workers)


def check_same_recipe(step: StepDir, manifest: dict, recipe: Recipe) -> None:
    """Refuse a recipe that would train another model or data than the checkpoint's (its
    manifest's fingerprint): reads the manifest only."""
    from launcher.checkpoint.state import fingerprint, fingerprint_diff

    diff = fingerprint_diff(manifest.get("fingerprint", {}), fingerprint(recipe))
    if diff:
        raise UserError(
            f"{step.path} was written by a different recipe; resuming would train another model or data:\n  "
            + "\n  ".join(diff)
            + "\nrevert these keys, or start over with --no-resume (the old run is kept aside)"
        )


def check_resume(run_dir: Path, recipe: Recipe, *, full_verify: bool = False) -> StepDir | None:
    """The checkpoint training will resume from, after checking it; None if there is none.

    Sizes against the manifest only (a stat per file), unless `full_verify`: the checksums were
    computed as the files were written, and reading a 70B checkpoint back costs about 1 TB of
    reads. A commit that then fails to load falls back to the previous one that passes a full
    verify (`reshard.load_checkpoint`)."""
    from launcher.checkpoint.reshard import reshard_problem
    step = latest_committed(run_dir)
    if step is None:
        return None
    manifest = read_manifest(step.path)
    check_same_recipe(step, manifest, recipe)
    layout = layout_of(recipe)
    problem = reshard_problem(manifest, layout)
    if problem:
        raise UserError(f"{step.path}: cannot resume: {problem}")
    problems = verify(step.path, checksums=full_verify, workers=4)
    if problems:
        raise UserError(
            f"{step.path} is damaged: " + "; ".join(map(str, problems[:3]))
            + f"{' ...' if len(problems) > 3 else ''}. Remove that step directory to resume from the one before "
            "(`launcher ckpt list`), or start over with --no-resume"
        )
    return step
