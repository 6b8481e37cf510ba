"""The trainer each worker runs: build, step, evaluate, save and stop.

It reads only the distributed environment (RANK, WORLD_SIZE, MASTER_ADDR, ... as torchrun or
Ray Train set them) and never knows which backend started it. What differs between layouts
lives in the step strategies (`steps.py`), what differs between methods in the objective
(`objective.py`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from launcher.recipe.load import to_dict
from launcher.recipe.sections import Recipe
from launcher.runtime.metrics import MetricsWriter
from launcher.runtime.trainer.batches import BatchStream, input_tokens, total_steps
from launcher.runtime.trainer.build import build
from launcher.runtime.trainer.distributed import all_sum, init_distributed, seed_everything
from launcher.runtime.trainer.objective import objective_for
from launcher.runtime.trainer.progress import Progress, jsonable_scheduler, truncate_metrics

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"


class Trainer:
    """One worker's share of a run. `fit()` trains to the end or to a stop request and returns
    the summary; rank 0 writes metrics, samples and the summary to `run_dir`."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, tokenizer: Any = None, data: Any = None,
                 resume: bool = True):
        from launcher.checkpoint.checkpointer import Checkpointer
        from launcher.checkpoint.preempt import WorkerSignals, notice_window_s
        from launcher.checkpoint.reshard import layout as parallel_layout
        from launcher.checkpoint.state import fingerprint
        from launcher.data import ResumableSampler, build_datasets, build_tokenizer

        self.recipe, self.run_dir = recipe, run_dir
        self.ctx = ctx = init_distributed()
        t = recipe.train
        self.signals = WorkerSignals(notice_window_s(recipe.checkpoint.preempt_window_s))
        seed_everything(t.seed)
        if tokenizer is None:
            tokenizer = build_tokenizer(recipe.tokenizer, recipe.model.name_or_path,
                                        trust_remote_code=recipe.model.trust_remote_code)
        self.tokenizer = tokenizer
        self.data = data if data is not None else build_datasets(recipe, tokenizer)
        self.stages = recipe.parallelism.pipeline_stages
        self.data_parallel = ctx.world_size // self.stages
        self.steps = total_steps(recipe, len(self.data.train), self.data_parallel)
        self.objective = objective_for(recipe, ctx.world_size)
        self.built = build(recipe, ctx, tokenizer, self.objective, steps=self.steps)
        self.engine, self.scheduler, self.strategy = self.built.engine, self.built.scheduler, self.built.strategy
        # Pipeline ranks are numbered stage-major (PipeDataParallelTopology): stage s, replica d is
        # rank s * data_parallel + d. Every stage of a replica draws the same micro-batches.
        self.sampler = ResumableSampler(len(self.data.train), num_replicas=self.data_parallel,
                                        rank=ctx.rank % self.data_parallel, seed=t.seed, shuffle=recipe.data.shuffle)
        self.layout = parallel_layout(recipe, ctx.world_size)
        self.ckpt = Checkpointer(run_dir, rank=ctx.rank, world_size=ctx.world_size,
                                 meta={**self.layout, "fingerprint": fingerprint(recipe)},
                                 keep_last=recipe.checkpoint.keep_last,
                                 pin_memory=ctx.on_gpu)  # pinned host copies: faster device-to-host
        self.progress = Progress()
        self.resumed_from = self.ckpt.find_resume() if resume else None
        if self.resumed_from is not None:
            self._restore()
        self.stream = BatchStream(self.data.train, self.sampler, t.micro_batch_size, tokenizer.pad_token_id)
        # collective with a pipeline (each stage counts its own layers): every rank takes part
        self.param_counts = self.strategy.param_counts()
        self.writer = self._open_metrics() if ctx.rank == 0 else None
        self.last_loss: float | None = None

    # -- build ------------------------------------------------------------------------------

    def _restore(self) -> None:
        from launcher.checkpoint.reshard import load_checkpoint
        from launcher.checkpoint.state import restore_rng

        state = load_checkpoint(self.engine, self.scheduler, self.resumed_from, self.ckpt, self.layout)
        self.progress.restore(state)
        self.sampler.load_state_dict(state["sampler"])
        if state.get("rng") is not None:
            restore_rng(state["rng"])  # last: everything above may draw random numbers

    def _open_metrics(self) -> MetricsWriter:
        p, data = self.progress, self.data
        truncate_metrics(self.run_dir, p.step)  # steps after the checkpoint are trained again
        writer = MetricsWriter(self.run_dir, self.recipe.logging, run_name=self.recipe.name,
                               recipe=to_dict(self.recipe))
        params_total, params_mine = self.param_counts
        if self.resumed_from is not None:
            # total_steps: a resume may move the end (train.max_steps=...); the display follows it
            writer.log({"event": "resume", "step": p.step, "checkpoint": self.resumed_from.path.name,
                        "total_steps": self.steps, "world_size": self.ctx.world_size, "time": time.time()})
        else:
            writer.log({"event": "start", "total_steps": self.steps, "world_size": self.ctx.world_size,
                        "train_examples": len(data.train), "eval_examples": len(data.eval),
                        "params": params_total, "params_on_rank0": params_mine, "time": time.time()})
        return writer

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        self.engine.train()
        self.progress.started = time.time()
        for step in range(self.progress.step + 1, self.steps + 1):
            record, deadline = self.train_step(step)
            if record.pop("_stop"):
                return self.stop(step, deadline, record["time"])
            self.after_step(step)
        return self.finish()

    def train_step(self, step: int) -> tuple[dict[str, Any], float | None]:
        """One optimizer step over a global batch; returns its metrics record (logged on rank 0)
        and the stop deadline if a stop was requested on any rank."""
        t, ctx, p = self.recipe.train, self.ctx, self.progress
        step_start = time.time()
        batches, step_ids = self.stream.global_batch(t.grad_accum)
        # Token-weighted loss: every micro-batch contributes sum(token losses) / N, N the label
        # tokens of the whole global batch. DeepSpeed divides by grad_accum and averages over the
        # data-parallel ranks, so each micro-batch's loss is scaled by their product.
        (g_items,) = all_sum([float(sum(self.objective.items(b) for b in batches))], ctx.device)
        g_items /= self.stages  # every stage of a replica drew the same batches
        num_items = max(g_items, 1.0) / (t.grad_accum * self.data_parallel)
        lr = self.scheduler.get_last_lr()[0]  # the rate this step applies (read before it moves)
        outcome = self.strategy.train(batches, num_items)
        deadline = self.signals.deadline(self.run_dir)
        # The stop decision rides on the step's all-reduce (over every rank, all stages): every
        # rank stops after the same step.
        g_loss, g_tokens, g_stop = all_sum(
            [outcome.loss_part, sum(input_tokens(b) for b in batches), float(deadline is not None)], ctx.device)
        g_loss, g_tokens = g_loss / self.stages, g_tokens / self.stages
        p.step, p.tokens_seen = step, p.tokens_seen + int(g_tokens)
        if not outcome.applied:
            p.skipped_steps += 1
        self.last_loss = g_loss
        now = time.time()
        record = {"step": step, "loss": g_loss, "lr": lr, "grad_norm": outcome.grad_norm,
                  "tokens": p.tokens_seen, "step_tokens": int(g_tokens), "label_tokens": int(g_items),
                  "tokens_per_s": g_tokens / max(now - step_start, 1e-9), "step_time_s": now - step_start,
                  "elapsed_s": p.elapsed(now), "time": now, **outcome.metrics}
        if not outcome.applied or p.skipped_steps:
            # overflow: the optimizer skipped this update; the schedule did not advance
            record.update(skipped=not outcome.applied, skipped_steps=p.skipped_steps)
        if self.recipe.logging.sample_ids:
            gathered: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(gathered, step_ids)
            # ranks 0 .. data_parallel-1 are the replicas (of stage 0 with a pipeline)
            record["sample_ids"] = sorted(i for ids in gathered[: self.data_parallel] for i in ids)
        if self.writer:
            self.writer.log(record)
        record["_stop"] = bool(g_stop)
        return record, deadline

    def after_step(self, step: int) -> None:
        t, ck = self.recipe.train, self.recipe.checkpoint
        if self.data.eval and t.eval_every and step % t.eval_every == 0 and step != self.steps:
            self.evaluate(step)
        if ck.every_steps and step % ck.every_steps == 0 and step != self.steps:
            self.save(step, background=ck.background)

    def evaluate(self, step: int) -> float:
        loss = self.strategy.evaluate(self.data.eval, self.recipe, self.tokenizer.pad_token_id)
        if self.writer:
            self.writer.log({"step": step, "eval": True, "eval_loss": loss})
        self.progress.last_eval = loss
        return loss

    # -- checkpoints and stops ----------------------------------------------------------------

    def rank_state(self) -> dict[str, Any]:
        from launcher.checkpoint.state import capture_rng

        return {**self.progress.saved(), "rank": self.ctx.rank, "sampler": self.sampler.state_dict(),
                "scheduler": jsonable_scheduler(self.scheduler.state_dict()), "rng": capture_rng()}

    def save(self, step: int, *, background: bool = False) -> Any:
        """Save `step`; with `background`, return once the state is in host memory (a handle),
        the files being written meanwhile. A save in flight is finished first."""
        from launcher.checkpoint.preempt import SaveAborted
        from launcher.runtime.run_lock import driver_gone

        def check_abort() -> None:
            if self.signals.aborted(self.run_dir):
                raise SaveAborted("a second stop request arrived during the save")
            if driver_gone():  # the reaper is about to stop this worker: commit nothing more
                raise SaveAborted("the run's driver is gone")

        if background:
            # A second signal during a background save aborts it through check_abort, in the
            # saving thread; the handler must not raise in the middle of a training step.
            return self.ckpt.save(self.engine, step, self.rank_state(), before_commit=check_abort,
                                  background=True)
        self.signals.saving = True
        try:
            self.ckpt.wait()  # the save in flight first: its files are not covered by this flag
            return self.ckpt.save(self.engine, step, self.rank_state(), before_commit=check_abort)
        finally:
            self.signals.saving = False

    def stop(self, step: int, deadline: float | None, now: float) -> dict[str, Any]:
        """End early at a stop request (signal or stop file), saving if the notice allows."""
        from launcher.checkpoint.preempt import PREEMPTED_FILE

        from launcher.runtime.trainer.finish import save_if_time

        preempted = {"step": step, "signal": self.signals.stop_signal(self.run_dir), "time": now}
        self.ckpt.wait()  # a background save in flight lands (or fails) before the decision
        preempted["committed"] = save_if_time(self.save, self.ckpt, step, deadline, now)
        self.signals.restore()
        if self.writer:
            self.writer.log({"event": "preempted", **preempted})
            self.writer.close()
            (self.run_dir / PREEMPTED_FILE).write_text(json.dumps(preempted) + "\n")
        dist.barrier()
        return {"preempted": True, **preempted}

    def finish(self) -> dict[str, Any]:
        from launcher.runtime.trainer.finish import finish

        return finish(self)


def train(recipe: Recipe, run_dir: Path, *, tokenizer: Any = None, data: Any = None,
          resume: bool = True) -> dict[str, Any]:
    """Train `recipe` on this worker; rank 0 writes metrics and samples to `run_dir`.

    With `resume`, training continues from the newest committed checkpoint in `run_dir` if
    there is one. `tokenizer` and `data` may be built once by the driver and shared; otherwise
    each worker builds them (as under torchrun). Returns the summary; `summary["preempted"]` is
    set when a stop was requested (signal or stop file) and training ended early.
    """
    return Trainer(recipe, run_dir, tokenizer=tokenizer, data=data, resume=resume).fit()
