"""One training job in the foreground: run directory, preflight, workers on Ray, summary."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import UserError
from launcher.recipe.load import to_yaml
from launcher.recipe.sections import Recipe
from launcher.runtime.metrics import METRICS_FILE, read_metrics
from launcher.runtime.train_loop import SAMPLES_FILE, SUMMARY_FILE

RECIPE_FILE = "recipe.yaml"


@dataclass
class JobResult:
    run_dir: Path
    summary: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    first_loss: float | None = None
    data_stats: dict[str, Any] = field(default_factory=dict)


def default_run_dir(recipe: Recipe, root: Path = Path("runs")) -> Path:
    return root / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that already holds a run: nothing of it may be lost."""
    if (run_dir / METRICS_FILE).exists():
        raise UserError(
            f"{run_dir} already holds a run ({METRICS_FILE} exists): choose another --run-dir "
            "or remove that directory"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} exists and is not a directory")


def prepare_run_dir(run_dir: Path, recipe: Recipe) -> None:
    """Create the run directory and record the fully resolved recipe."""
    check_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECIPE_FILE).write_text(to_yaml(recipe))


def preflight(recipe: Recipe) -> tuple[Any, Any]:
    """Build tokenizer and data here, so that bad input fails before any worker starts."""
    from launcher.data import build_datasets, build_tokenizer

    if recipe.parallelism.pipeline_stages > 1:
        raise UserError(
            "parallelism.pipeline_stages > 1 is not supported by this version yet: set "
            "parallelism.pipeline_stages=1"
        )
    if recipe.logging.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError(
                "logging.wandb_project is set but wandb is not installed: pip install wandb, "
                "or remove logging.wandb_project"
            ) from None
    tokenizer = build_tokenizer(recipe.tokenizer, recipe.model.name_or_path)
    data = build_datasets(recipe, tokenizer)
    if not data.train:
        raise UserError("the data produced no training examples: check data.path and data.format")
    return tokenizer, data


def run_job(
    recipe: Recipe,
    run_dir: Path,
    *,
    ray_address: str | None = None,
    progress: Any = None,
) -> JobResult:
    """Train `recipe` with its run directory at `run_dir`. `progress(run_dir)` is a context
    manager that displays live progress while the workers train."""
    from contextlib import nullcontext

    from launcher.runtime.driver import run_on_ray

    check_run_dir(run_dir)
    tokenizer, data = preflight(recipe)
    prepare_run_dir(run_dir, recipe)
    (run_dir / "data_stats.json").write_text(json.dumps(data.stats, indent=2) + "\n")
    with progress(run_dir) if progress else nullcontext():
        run_on_ray(recipe, run_dir, tokenizer=tokenizer, data=data, ray_address=ray_address)
    return load_result(run_dir)


def load_result(run_dir: Path) -> JobResult:
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    samples = []
    if (run_dir / SAMPLES_FILE).exists():
        samples = [json.loads(x) for x in (run_dir / SAMPLES_FILE).read_text().splitlines() if x]
    steps = [m for m in read_metrics(run_dir / METRICS_FILE) if "loss" in m]
    stats_file = run_dir / "data_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    return JobResult(run_dir, summary, samples, steps[0]["loss"] if steps else None, stats)
