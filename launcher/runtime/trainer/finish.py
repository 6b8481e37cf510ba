"""The end of a run: the last evaluation and save, samples, the summary and the export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from launcher.runtime.trainer.distributed import peak_memory
from launcher.runtime.trainer.progress import last_logged_loss


def save_if_time(save: Any, ckpt: Any, step: int, deadline: float | None, now: float) -> str | None:
    """Save at a stop request if the last save fits in what is left of the notice window."""
    from launcher.checkpoint.checkpointer import broadcast
    from launcher.checkpoint.layout import step_tag

    left = (deadline - now) if deadline is not None else None
    # every rank must take the same decision: rank 0's view is broadcast
    if not broadcast(left is None or ckpt.last_save_s is None or ckpt.last_save_s * 1.5 < left):
        return None
    save(step)
    return step_tag(step)


def _samples(trainer: Any) -> tuple[list[dict], int]:
    """Greedy samples of the recipe's prompts (collective under ZeRO-3), and how many were skipped."""
    from launcher.data import render_prompt
    from launcher.runtime.trainer.evaluation import generate_samples

    recipe, tokenizer = trainer.recipe, trainer.tokenizer
    prompts = [{"prompt": render_prompt(recipe, tokenizer, p)} for p in recipe.sample.prompts]
    prompts += trainer.data.eval_prompts[: recipe.sample.from_eval]
    if prompts and not trainer.strategy.can_generate:
        print(f"sample: {len(prompts)} generations skipped: a pipeline-parallel model "
              "(parallelism.pipeline_stages > 1) does not generate; export it and generate from the export",
              flush=True)
        return [], len(prompts)
    if not prompts:
        return [], 0
    return generate_samples(trainer.engine, tokenizer, prompts, trainer.ctx, recipe), 0


def finish(trainer: Any) -> dict[str, Any]:
    """Evaluate and save at the end, sample, write the summary; rank 0 then exports with no
    other rank waiting on it."""
    p, ck, steps = trainer.progress, trainer.recipe.checkpoint, trainer.steps
    trained = p.step > (trainer.resumed_from.step if trainer.resumed_from is not None else 0)
    if trainer.data.eval and (trained or p.last_eval is None):
        trainer.evaluate(steps)
    final_dir = trainer.save(steps) if (ck.at_end or ck.every_steps or ck.export_hf_at_end) else None
    trainer.ckpt.wait()  # a background save still in flight (no save at the end) lands first
    trainer.signals.restore()
    samples, skipped = _samples(trainer)
    summary = {
        "steps": steps,
        "tokens": p.tokens_seen,
        "elapsed_s": p.elapsed(),
        "final_loss": trainer.last_loss if trainer.last_loss is not None else last_logged_loss(trainer.run_dir),
        "eval_loss": p.last_eval,
        "world_size": trainer.ctx.world_size,
        "resumed_from_step": trainer.resumed_from.step if trainer.resumed_from is not None else None,
        "peak_memory_bytes": peak_memory(trainer.ctx),
    }
    if p.skipped_steps:
        summary["skipped_steps"] = p.skipped_steps
    if skipped:
        summary["samples_skipped"] = skipped
    # The last collective of the run. The export below takes minutes for a large model; a rank
    # held in a barrier meanwhile would pass the collective timeout.
    dist.barrier()
    if trainer.ctx.rank == 0:
        _write_results(trainer, summary, samples, final_dir if ck.export_hf_at_end else None)
    return summary


def _write_results(trainer: Any, summary: dict[str, Any], samples: list[dict], export_from: Path | None) -> None:
    from launcher.runtime.trainer.trainer import SAMPLES_FILE, SUMMARY_FILE

    run_dir, writer = trainer.run_dir, trainer.writer
    with open(run_dir / SAMPLES_FILE, "w") as f:
        for s in samples:
            f.write(json.dumps(s) + "\n")
    if export_from is not None:
        summary["hf_export"] = str(run_dir / "hf")
        _export(trainer, export_from, run_dir / "hf")
    writer.log({"event": "end", **summary})
    writer.close()
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def _export(trainer: Any, step_dir: Path, out: Path) -> None:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from launcher.checkpoint.export import export_checkpoint

    # The export builds the model on the meta device; with ZeRO-3's config still active
    # transformers would build it inside zero.Init, collectively, on rank 0 alone (a hang).
    unset_hf_deepspeed_config()
    trainer.built.hf_ds_config = None
    recipe = trainer.recipe
    # this run's own recipe, which the user started: its trust_remote_code holds here (a `ckpt
    # export` of someone else's run directory takes it only from --trust-remote-code). A LoRA
    # run's checkpoint is exported as its PEFT adapter (and a random-init base in hf/base/).
    export_checkpoint(step_dir, out, recipe=recipe, dtype=recipe.model.dtype,
                      trust_remote_code=recipe.model.trust_remote_code)
