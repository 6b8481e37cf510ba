"""`launcher ckpt export`: a committed checkpoint to a Hugging Face model directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from launcher.cli.ckpt_cmds import behind
from launcher.cli.common import console
from launcher.errors import UserError


def resolve_step_dir(run_dir: Path, step: int | None) -> Path:
    """The committed step directory to export: `--step N`, else the one `latest` names, else the
    newest committed one. An uncommitted directory (no manifest.json) is refused."""
    from launcher.checkpoint.layout import MANIFEST, checkpoints_dir, latest_committed, list_step_dirs, step_tag

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run directory does not exist: pass the directory `launcher run` wrote")
    root = checkpoints_dir(run_dir)
    if step is not None:
        path = root / step_tag(step)
        if not path.is_dir():
            raise UserError(f"{path}: no checkpoint for step {step}: see `launcher ckpt list {run_dir}`")
    else:
        latest = latest_committed(run_dir)
        if latest is None:
            if list_step_dirs(run_dir):
                raise UserError(
                    f"{run_dir}: no committed checkpoint: the step directories under {root} have no "
                    f"{MANIFEST} (their saves did not finish)"
                )
            raise UserError(
                f"{run_dir}: no committed checkpoint under {root}: train with checkpoint.every_steps or "
                "checkpoint.at_end, or pass --step"
            )
        path = latest.path
    if not (path / MANIFEST).is_file():
        raise UserError(
            f"{path}: not committed (no {MANIFEST}): the save did not finish; export another step "
            f"(`launcher ckpt list {run_dir}`)"
        )
    return path


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def ckpt_export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="New directory for the Hugging Face model.", show_default=False)],
    step: Annotated[Optional[int], typer.Option("--step", help="Export this step (default: the latest committed).")] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Largest safetensors file: 5GB, 500MB, 2GiB or bytes.")
    ] = "5GB",
    dtype: Annotated[str, typer.Option("--dtype", help="Weights dtype: bf16, fp32 or fp16.")] = "bf16",
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code",
        help="Run the Python code a hub model ships (its config/tokenizer classes). Off unless given: "
             "the run's recipe.yaml is never taken as consent.")] = False,
    merge: Annotated[bool, typer.Option(
        "--merge", help="LoRA runs: write the base with the adapters merged in (Hugging Face shards) "
                        "instead of the adapter.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Consolidate a committed ZeRO checkpoint into safetensors shards + index, config and tokenizer.

    Streams one tensor at a time (memory stays near the largest tensor, not the model) and never
    unpickles code. The result loads with AutoModelForCausalLM.from_pretrained(OUT).

    A LoRA run (train.method: lora | qlora) exports its adapter in PEFT's format
    (adapter_model.safetensors + adapter_config.json, for peft.PeftModel.from_pretrained; a base
    built from model.config is written to OUT/base); --merge writes the merged model instead.

    Example: launcher ckpt export runs/tiny-sft-demo --out exports/tiny --dtype bf16

    Example (LoRA, merged): launcher ckpt export runs/tiny-lora --out exports/tiny-lora-merged --merge

    Example (a model with its own code): launcher ckpt export runs/x --out exports/x --trust-remote-code
    """
    from launcher.checkpoint.export import export_checkpoint

    step_dir = resolve_step_dir(run_dir, step)
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise UserError(f"{recipe_file}: missing: the export needs the run's recipe for the model config and tokenizer")
    recipe = recipe_file  # loaded by the export while its writer thread streams the tensors

    if as_json or not sys.stdout.isatty():
        summary = export_checkpoint(step_dir, out, recipe=recipe, dtype=dtype, max_shard_size=max_shard_size,
                                    trust_remote_code=trust_remote_code, merge=merge)
    else:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("exporting"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("export", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            summary = export_checkpoint(step_dir, out, recipe=recipe, dtype=dtype,
                                        max_shard_size=max_shard_size, progress=progress,
                                        trust_remote_code=trust_remote_code, merge=merge)
    from launcher.checkpoint.layout import latest_committed, step_of

    latest = latest_committed(run_dir)
    last, gap = behind(run_dir, step_of(step_dir.name), latest is not None and latest.path == step_dir)
    if as_json:
        print(json.dumps({**summary, "run_last_step": last, "steps_not_exported": (
            None if last is None else max(0, last - (step_of(step_dir.name) or 0)))}, indent=2))
        return
    if gap:
        # the steps after the exported one are in no checkpoint: the export is an older model
        console.print(Text(f"note: {gap}", style="yellow"))
    if summary.get("lora") and not summary.get("merged"):
        base = f"; its base model in {summary['base']}" if summary.get("base") else ""
        console.print(f"exported the LoRA adapter of {step_dir.name} ({summary['params']:,} parameters, "
                      f"{summary['dtype']}) to {out}{base} in {summary['seconds']:.1f}s", highlight=False)
        return
    console.print(
        f"exported {step_dir.name} ({summary['params']:,} parameters, {summary['dtype']}) to {out}: "
        f"{len(summary['files']) - 1} safetensors file(s), {_human(summary['total_bytes'])} "
        f"in {summary['seconds']:.1f}s",
        highlight=False,
    )
