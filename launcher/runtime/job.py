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
    preempted: dict[str, Any] | None = None
    """Set when a signal stopped training: {step, signal, committed (step directory or None)}."""


def default_run_dir(recipe: Recipe, root: Path = Path("runs")) -> Path:
    return root / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def has_run(run_dir: Path) -> bool:
    return (run_dir / METRICS_FILE).exists() or (run_dir / "checkpoints").is_dir()


def check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} exists and is not a directory")


def set_aside(run_dir: Path) -> Path:
    """Move an earlier run out of the way (for --no-resume): nothing is deleted."""
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    return aside


def prepare_run_dir(run_dir: Path, recipe: Recipe) -> None:
    """Create the run directory and record the fully resolved recipe (the latest one on resume);
    values read through `${oc.env:...}` are recorded as that reference, never as the value."""
    check_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECIPE_FILE).write_text(to_yaml(recipe))


def preflight(recipe: Recipe, *, data_progress: Any = None) -> tuple[Any, Any]:
    """Build the tokenizer and prepare the data here (or find it prepared in `data.cache_dir`), so
    that bad input fails before any worker starts. Resolves relative model and tokenizer
    directories in `recipe` to absolute ones (in place). The data's splits are memory-mapped
    files that pickle as their paths: workers open them instead of receiving the tokens.
    `data_progress(event)` hears the prepare's progress (see launcher.data.prepare)."""
    from launcher.data import build_tokenizer
    from launcher.data.prepare import prepare_datasets

    if recipe.logging.wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError(
                "logging.wandb_project is set but wandb is not installed: pip install wandb, "
                "or remove logging.wandb_project"
            ) from None
    import sys

    from launcher.pretrained import check_model, go_offline_if_unreachable, resolve_local_paths
    from launcher.runtime.devices import check_devices

    # Relative model/tokenizer directories become absolute before the recipe is recorded and
    # shipped: workers may run in another directory. Then config and tokenizer files (never
    # weights) must resolve here, so a missing model exits 2 before Ray starts.
    resolve_local_paths(recipe)
    note = go_offline_if_unreachable(recipe)
    if note:
        print(f"note: {note}", file=sys.stderr)
    check_model(recipe)
    check_devices(recipe)  # fp16 on CPU; LoRA targets of a pretrained model, bitsandbytes
    tokenizer = build_tokenizer(
        recipe.tokenizer, recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code
    )
    if recipe.parallelism.pipeline_stages > 1:
        from launcher.runtime.model import model_config
        from launcher.runtime.pipeline import check_stages

        # a supported model family, and no more stages than decoder layers
        check_stages(model_config(recipe.model, tokenizer), recipe.parallelism.pipeline_stages)
    data = prepare_datasets(recipe, tokenizer, progress=data_progress)
    if not data.train:
        raise UserError("the data produced no training examples: check data.path and data.format")
    return tokenizer, data


def run_job(
    recipe: Recipe,
    run_dir: Path,
    *,
    ray_address: str | None = None,
    progress: Any = None,
    resume: bool = True,
    notify: Any = None,
) -> JobResult:
    """Train `recipe` with its run directory at `run_dir`. `progress(run_dir)` is a context
    manager that displays live progress while the workers train (what it yields may have a
    `phase(text)` method, told what the job is doing before its first step); `notify(message)`
    hears about resumes and restarts, and the phases when there is no such display.

    A run directory that already holds a run is resumed from its newest committed checkpoint
    (`resume=False`: the old run is moved aside and training starts over). Returns with
    `preempted` set when a signal stopped training (the CLI exits with EXIT_PREEMPTED)."""
    from launcher.pretrained import resolve_local_paths
    from launcher.runtime.run_lock import hold_run

    # Before anything reads the recipe: the checkpoint fingerprint records the absolute model
    # directory, so `models/mine` must compare equal when the same command runs again.
    resolve_local_paths(recipe)
    say = notify or (lambda message: None)
    check_run_dir(run_dir)
    with hold_run(run_dir, "launcher run" if resume else "launcher run --no-resume"):
        return _run_held(recipe, run_dir, ray_address=ray_address, progress=progress, resume=resume, say=say)


def _run_held(recipe: Recipe, run_dir: Path, *, ray_address: str | None, progress: Any, resume: bool,
              say: Any) -> JobResult:
    """`run_job` while this process holds the run directory."""
    from contextlib import nullcontext

    from launcher.checkpoint import preempt
    from launcher.runtime.driver import PHASE_FILE, run_on_ray

    resume_from = _resume_point(run_dir, recipe, resume, say)
    finished = (run_dir / SUMMARY_FILE).exists() and resume_from is not None
    if finished and recipe.train.max_steps is not None and resume_from.step >= recipe.train.max_steps:
        # Every example recipe now saves at the end: a second `launcher run` of the same command
        # used to start Ray for minutes to train nothing.
        say(f"{run_dir} already finished at step {resume_from.step}: nothing to train "
            f"(raise train.max_steps to go on)")
        return load_result(run_dir)
    say("checking the model, tokenizer and data")  # before Ray: a hub model can take a while
    tokenizer, data = preflight(recipe, data_progress=_data_notes(say))
    prepare_run_dir(run_dir, recipe)
    preempt.clear(run_dir)
    (run_dir / SUMMARY_FILE).unlink(missing_ok=True)
    (run_dir / PHASE_FILE).unlink(missing_ok=True)  # an earlier run's
    (run_dir / "data_stats.json").write_text(json.dumps(data.stats, indent=2) + "\n")
    with progress(run_dir) if progress else nullcontext() as display:
        run_on_ray(recipe, run_dir, tokenizer=tokenizer, data=data, ray_address=ray_address,
                   phase=getattr(display, "phase", None) or say)
    stopped = run_dir / preempt.PREEMPTED_FILE
    if stopped.exists():
        return JobResult(run_dir, {}, preempted=json.loads(stopped.read_text()))
    return load_result(run_dir)


def _data_notes(say: Any) -> Any:
    """Tells `say` which data sets were found prepared and which were prepared now."""

    def hear(event: dict[str, Any]) -> None:
        if event["event"] == "cached":
            say(f"data: {event['source']}: prepared earlier, {event['path']}")
        elif event["event"] == "done":
            say(f"data: {event['source']}: prepared {event['rows']} rows, {event['tokens']} tokens "
                f"in {event['seconds']:.1f} s -> {event['path']}")

    return hear


def _resume_point(run_dir: Path, recipe: Recipe, resume: bool, say: Any) -> Any:
    """The committed checkpoint a run continues from (None: from step 0); `--no-resume` moves an
    earlier run aside."""
    from launcher.checkpoint.layout import list_step_dirs
    from launcher.checkpoint.preflight import check_resume

    if not has_run(run_dir):
        return None
    if not resume:
        say(f"--no-resume: the earlier run was moved to {set_aside(run_dir)}")
        return None
    for s in list_step_dirs(run_dir):
        if s.problem:  # a manifest next to missing or partial files (a cut-short upload)
            say(f"skipping {s.path.name}, not completely written ({s.problem}); it is removed")
    resume_from = check_resume(run_dir, recipe)
    if resume_from is not None:
        say(f"resuming from {resume_from.path}")
        return resume_from
    if (run_dir / SUMMARY_FILE).exists():
        raise UserError(
            f"{run_dir} already holds a finished run and no committed checkpoint to continue "
            "from: choose another --run-dir, or --no-resume to move that run aside and start over"
        )
    # stopped before its first checkpoint (e.g. preempted early): start over, keep its log
    old = run_dir / METRICS_FILE
    if old.exists():
        old.rename(run_dir / f"metrics.before-restart-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    say(f"{run_dir} has no committed checkpoint: training starts from step 0")
    return None


def load_result(run_dir: Path) -> JobResult:
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    samples = []
    if (run_dir / SAMPLES_FILE).exists():
        samples = [json.loads(x) for x in (run_dir / SAMPLES_FILE).read_text().splitlines() if x]
    steps = [m for m in read_metrics(run_dir / METRICS_FILE) if "loss" in m]
    stats_file = run_dir / "data_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    return JobResult(run_dir, summary, samples, steps[0]["loss"] if steps else None, stats)
