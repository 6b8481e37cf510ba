"""The training loop each worker runs.

It reads only the distributed environment (RANK, WORLD_SIZE, MASTER_ADDR, ... as torchrun or
Ray Train set them) and never knows which backend started it.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from launcher.recipe.load import to_dict
from launcher.recipe.sections import Recipe
from launcher.runtime.ds_config import build_ds_config
from launcher.runtime.metrics import MetricsWriter
from launcher.runtime.model import build_model, param_groups
from launcher.runtime.schedule import lr_multiplier

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    on_gpu: bool


def init_distributed() -> WorkerContext:
    """Join the process group described by the environment (gloo on CPU, NCCL on GPU)."""
    import deepspeed

    on_gpu = torch.cuda.is_available()
    # Always: DeepSpeed's comm layer wraps an existing process group (Ray Train makes one) but
    # reports world size 1 unless initialised itself.
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return WorkerContext(dist.get_rank(), dist.get_world_size(), local_rank, device, on_gpu)


def total_steps(recipe: Recipe, train_examples: int, data_parallel: int) -> int:
    t = recipe.train
    if t.max_steps is not None:
        return t.max_steps
    per_step = t.micro_batch_size * t.grad_accum * data_parallel
    steps_per_epoch = train_examples // per_step
    if steps_per_epoch == 0:
        from launcher.errors import RecipeError

        raise RecipeError(
            "train.micro_batch_size",
            f"{train_examples} training examples are fewer than one global batch ({per_step}): "
            "lower train.micro_batch_size or train.grad_accum",
        )
    return max(1, math.floor(t.epochs * steps_per_epoch))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class BatchStream:
    """Micro-batches for this rank from the resumable sampler, across epoch boundaries."""

    def __init__(self, examples: list[dict], sampler: Any, micro_batch_size: int, pad_id: int):
        from launcher.data import collate

        self._collate = collate
        self.examples = examples
        self.sampler = sampler
        self.micro = micro_batch_size
        self.pad_id = pad_id
        self._it: Iterator[int] = iter(sampler)

    def next(self) -> dict[str, torch.Tensor]:
        idx: list[int] = []
        while len(idx) < self.micro:
            try:
                idx.append(next(self._it))
            except StopIteration:
                self.sampler.set_epoch(self.sampler.state_dict()["epoch"] + 1)
                self._it = iter(self.sampler)
        self.last_ids = idx
        return self._collate([self.examples[i] for i in idx], pad_id=self.pad_id)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens that contribute to the causal-LM loss: transformers shifts labels by one, so
    the first position of each row never counts."""
    return int((batch["labels"][..., 1:] != -100).sum())


def evaluate(engine: Any, examples: list[dict], ctx: WorkerContext, recipe: Recipe, pad_id: int) -> float:
    """Token-weighted mean loss (sum of token losses / label tokens) over the first
    `train.eval_batches` micro-batches of the eval set, all ranks."""
    from launcher.data import collate

    micro = recipe.train.micro_batch_size
    cap = micro * recipe.train.eval_batches
    mine = examples[ctx.rank :: ctx.world_size][:cap]
    # ZeRO-3 forwards are collective, so every rank runs as many as the rank with the most data;
    # a rank that has run out repeats one example and does not count it.
    per_rank = min(-(-len(examples) // ctx.world_size), cap)
    loss_sum, n = 0.0, 0
    engine.eval()
    with torch.no_grad():
        for i in range(0, per_rank, micro):
            chunk = mine[i : i + micro]
            batch = _to(collate(chunk or examples[:1], pad_id=pad_id), ctx.device)
            # num_items_in_batch=1: the loss is the sum over tokens, not their mean
            out = engine(**batch, num_items_in_batch=1.0)
            if chunk:
                loss_sum += out.loss.item()
                n += label_count(batch)
    engine.train()
    total_loss, total_n = _all_sum([loss_sum, n], ctx.device)
    return total_loss / max(total_n, 1)


def evaluate_pipeline(engine: Any, examples: list[dict], ctx: WorkerContext, recipe: Recipe, pad_id: int) -> float:
    """`evaluate` through the pipeline engine: each replica (data-parallel rank) evaluates its
    share as one `eval_batch` of micro-batches; a replica that has run out repeats one example
    with every label masked, which adds nothing."""
    from launcher.data import collate
    from launcher.runtime.pipeline import pipe_micro_batch

    stages = recipe.parallelism.pipeline_stages
    replicas = ctx.world_size // stages
    replica = ctx.rank % replicas
    micro = recipe.train.micro_batch_size
    cap = micro * recipe.train.eval_batches
    mine = examples[replica::replicas][:cap]
    per_rank = min(-(-len(examples) // replicas), cap)
    batches, n = [], 0
    for i in range(0, per_rank, micro):
        chunk = mine[i : i + micro]
        batch = collate(chunk or examples[:1], pad_id=pad_id)
        if chunk:
            n += label_count(batch)
        else:
            batch["labels"] = torch.full_like(batch["labels"], -100)
        batches.append(pipe_micro_batch(batch, 1.0))  # num_items 1: each loss is a sum over tokens
    # the mean over micro-batches and replicas of the sums, on every rank
    mean = engine.eval_batch(iter(batches), num_micro_batches=len(batches))
    (total_n,) = _all_sum([float(n)], ctx.device)
    engine.module.train()
    return float(mean) * len(batches) * replicas / max(total_n / stages, 1.0)


def generate_samples(
    engine: Any, tokenizer: Any, prompts: list[dict], ctx: WorkerContext, recipe: Recipe
) -> list[dict]:
    """Greedy completions; every rank runs them because ZeRO-3 forwards are collective."""
    model = engine.module
    model.eval()
    results = []
    synced = recipe.parallelism.zero_stage == 3 and ctx.world_size > 1
    with torch.no_grad():
        for p in prompts:
            # the tokenizer's own special-token rule is the one training examples were built with
            ids = tokenizer(p["prompt"], return_tensors="pt").input_ids
            out = model.generate(
                ids.to(ctx.device),
                attention_mask=torch.ones_like(ids).to(ctx.device),
                max_new_tokens=recipe.sample.max_new_tokens,
                do_sample=False,
                synced_gpus=synced,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            results.append({**p, "generated": text})
    model.train()
    return results


def train(
    recipe: Recipe,
    run_dir: Path,
    *,
    tokenizer: Any = None,
    data: Any = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Train `recipe` on this worker; rank 0 writes metrics and samples to `run_dir`.

    With `resume`, training continues from the newest committed checkpoint in `run_dir` if
    there is one. `tokenizer` and `data` may be built once by the driver and shared; otherwise
    each worker builds them (as under torchrun). Returns the summary; `summary["preempted"]` is
    set when a stop was requested (signal or stop file) and training ended early.
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from launcher.checkpoint.checkpointer import Checkpointer
    from launcher.checkpoint.reshard import layout as parallel_layout
    from launcher.checkpoint.preempt import PREEMPTED_FILE, SaveAborted, WorkerSignals, notice_window_s
    from launcher.checkpoint.state import capture_rng, fingerprint, restore_rng
    from launcher.data import ResumableSampler, build_datasets, build_tokenizer, render_prompt

    ctx = init_distributed()
    t = recipe.train
    signals = WorkerSignals(notice_window_s(recipe.checkpoint.preempt_window_s))
    _seed_everything(t.seed)
    if tokenizer is None:
        tokenizer = build_tokenizer(recipe.tokenizer, recipe.model.name_or_path,
                                    trust_remote_code=recipe.model.trust_remote_code)
    if data is None:
        data = build_datasets(recipe, tokenizer)
    pad_id = tokenizer.pad_token_id

    stages = recipe.parallelism.pipeline_stages
    data_parallel = ctx.world_size // stages
    # Pipeline ranks are numbered stage-major (PipeDataParallelTopology): stage s, replica d is
    # rank s * data_parallel + d. Every stage of a replica draws the same micro-batches.
    dp_rank = ctx.rank % data_parallel
    steps = total_steps(recipe, len(data.train), data_parallel)
    ds_config = build_ds_config(recipe, data_parallel=data_parallel, on_gpu=ctx.on_gpu)
    hf_ds = HfDeepSpeedConfig(ds_config) if recipe.parallelism.zero_stage == 3 else None  # noqa: F841
    if stages > 1:
        from dataclasses import replace

        from launcher.runtime.pipeline import build_pipeline_module

        # the pipeline checkpoints whole decoder layers itself (activation_checkpoint_interval)
        hf_model = build_model(replace(recipe.model, gradient_checkpointing=False), tokenizer, seed=t.seed)
        model = build_pipeline_module(
            hf_model, stages=stages, partition=recipe.parallelism.pipeline_partition,
            activation_checkpointing=recipe.model.gradient_checkpointing)
        del hf_model  # this stage's layers live on in `model`; the others are freed
    else:
        model = build_model(recipe.model, tokenizer, seed=t.seed)
    multiplier = lr_multiplier(
        t.schedule, warmup_steps=t.warmup_steps, total_steps=steps, min_ratio=t.min_lr_ratio
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier),
    )
    if stages > 1:
        assert engine.grid.data_parallel_id == dp_rank and engine.grid.data_parallel_size == data_parallel
        if recipe.parallelism.zero_stage == 0:
            from launcher.runtime.pipeline import record_grad_norm

            record_grad_norm(engine)
    sampler = ResumableSampler(
        len(data.train),
        num_replicas=data_parallel,
        rank=dp_rank,
        seed=t.seed,
        shuffle=recipe.data.shuffle,
    )
    layout = parallel_layout(recipe, ctx.world_size)
    ckpt = Checkpointer(
        run_dir,
        rank=ctx.rank,
        world_size=ctx.world_size,
        meta={**layout, "fingerprint": fingerprint(recipe)},
        keep_last=recipe.checkpoint.keep_last,
    )

    start_step, tokens_seen, elapsed_before, last_eval = 0, 0, 0.0, None
    resumed_from = ckpt.find_resume() if resume else None
    if resumed_from is not None:
        from launcher.checkpoint.reshard import load_checkpoint

        state = load_checkpoint(engine, scheduler, resumed_from, ckpt, layout)
        start_step = int(state["step"])
        tokens_seen = int(state["tokens_seen"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        last_eval = state.get("last_eval")
        sampler.load_state_dict(state["sampler"])
        if state.get("rng") is not None:
            restore_rng(state["rng"])  # last: everything above may draw random numbers
    stream = BatchStream(data.train, sampler, t.micro_batch_size, pad_id)

    params = list(engine.module.parameters())
    # Under ZeRO-3 each parameter is a placeholder; ds_numel is its full size, ds_tensor this rank's part.
    params_total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    params_rank0 = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    if stages > 1:  # each stage holds its layers: count replica 0's, a tied copy once
        mine = sum(p.numel() for p in params if not getattr(p, "ds_pipe_replicated", False))
        (params_total,) = _all_sum([float(mine if dp_rank == 0 else 0)], ctx.device)
        params_total = int(params_total)
    writer = None
    if ctx.rank == 0:
        _truncate_metrics(run_dir, start_step)  # steps after the checkpoint are trained again
        writer = MetricsWriter(run_dir, recipe.logging, run_name=recipe.name, recipe=to_dict(recipe))
        if resumed_from is not None:
            # total_steps: a resume may move the end (train.max_steps=...); the display follows it
            writer.log({"event": "resume", "step": start_step, "checkpoint": resumed_from.path.name,
                        "total_steps": steps, "world_size": ctx.world_size, "time": time.time()})
        else:
            writer.log({"event": "start", "total_steps": steps, "world_size": ctx.world_size,
                        "train_examples": len(data.train), "eval_examples": len(data.eval),
                        "params": params_total, "params_on_rank0": params_rank0, "time": time.time()})

    def rank_state(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "rank": ctx.rank,
            "tokens_seen": tokens_seen,
            "elapsed_s": elapsed_before + time.time() - start,
            "last_eval": last_eval,
            "sampler": sampler.state_dict(),
            "scheduler": _jsonable(scheduler.state_dict()),
            "rng": capture_rng(),
        }

    def save(step: int) -> Path | None:
        def check_abort() -> None:
            if signals.aborted(run_dir):
                raise SaveAborted("a second stop request arrived during the save")

        signals.saving = True
        try:
            return ckpt.save(engine, step, rank_state(step), before_commit=check_abort)
        finally:
            signals.saving = False

    engine.train()
    start = time.time()
    record: dict[str, Any] = {"loss": None}
    preempted: dict[str, Any] | None = None
    step = start_step
    for step in range(start_step + 1, steps + 1):
        step_start = time.time()
        batches, step_ids = [], []
        for _ in range(t.grad_accum):
            batches.append(stream.next())
            step_ids += stream.last_ids
        step_tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                          for b in batches)
        # Token-weighted loss: every micro-batch contributes sum(token losses) / N, N the label
        # tokens of the whole global batch. DeepSpeed divides by grad_accum and averages over the
        # data-parallel ranks, so each micro-batch's loss is scaled by their product.
        (g_labels,) = _all_sum([float(sum(label_count(b) for b in batches))], ctx.device)
        g_labels /= stages  # every stage of a replica drew the same batches
        num_items = max(g_labels, 1.0) / (t.grad_accum * data_parallel)
        plain_norm = None
        if stages > 1:
            from launcher.runtime.pipeline import pipe_micro_batch

            # the mean over micro-batches and replicas of sum(CE) / num_items: sum(CE) / N, on every rank
            step_loss = engine.train_batch(iter([pipe_micro_batch(b, num_items) for b in batches]))
            loss_part = step_loss.item() / data_parallel
            plain_norm = getattr(engine, "launcher_grad_norm", None)
        else:
            loss_sum = 0.0
            for i, batch in enumerate(batches):
                out = engine(**_to(batch, ctx.device), num_items_in_batch=num_items)
                engine.backward(out.loss)
                if i == len(batches) - 1 and recipe.parallelism.zero_stage == 0:
                    plain_norm = _plain_grad_norm(engine)  # DeepSpeed reports none without ZeRO
                engine.step()
                loss_sum += out.loss.item()
            loss_part = loss_sum / (t.grad_accum * data_parallel)
        deadline = signals.deadline(run_dir)
        # The stop decision rides on the step's all-reduce (over every rank, all stages): every
        # rank stops after the same step.
        g_loss, g_tokens, g_stop = _all_sum([loss_part, step_tokens, float(deadline is not None)], ctx.device)
        g_loss /= stages
        g_tokens /= stages
        tokens_seen += int(g_tokens)
        now = time.time()
        record = {
            "step": step,
            "loss": g_loss,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": _grad_norm(engine) if plain_norm is None else plain_norm,
            "tokens": tokens_seen,
            "step_tokens": int(g_tokens),
            "label_tokens": int(g_labels),
            "tokens_per_s": g_tokens / max(now - step_start, 1e-9),
            "step_time_s": now - step_start,
            "elapsed_s": elapsed_before + now - start,
            "time": now,
        }
        if recipe.logging.sample_ids:
            gathered: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(gathered, step_ids)
            # ranks 0 .. data_parallel-1 are the replicas (of stage 0 with a pipeline)
            record["sample_ids"] = sorted(i for ids in gathered[:data_parallel] for i in ids)
        if writer:
            writer.log(record)
        if g_stop:
            preempted = {"step": step, "signal": signals.stop_signal(run_dir), "time": now}
            preempted["committed"] = _save_if_time(save, ckpt, step, deadline, now)
            break
        if data.eval and t.eval_every and step % t.eval_every == 0 and step != steps:
            last_eval = _log_eval(engine, data.eval, ctx, recipe, pad_id, writer, step)
        if recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0 and step != steps:
            save(step)

    if preempted is not None:
        signals.restore()
        if writer:
            writer.log({"event": "preempted", **preempted})
            writer.close()
            (run_dir / PREEMPTED_FILE).write_text(json.dumps(preempted) + "\n")
        dist.barrier()
        return {"preempted": True, **preempted}

    if data.eval and (step > start_step or last_eval is None):
        last_eval = _log_eval(engine, data.eval, ctx, recipe, pad_id, writer, steps)
    final_dir = None
    ck = recipe.checkpoint
    if ck.at_end or ck.every_steps or ck.export_hf_at_end:
        final_dir = save(steps)
    signals.restore()

    prompts = [{"prompt": render_prompt(recipe, tokenizer, p)} for p in recipe.sample.prompts]
    prompts += data.eval_prompts[: recipe.sample.from_eval]
    samples_skipped = 0
    if prompts and stages > 1:
        # No rank holds the whole model; the export (checkpoint.export_hf_at_end) is the way to
        # generate from a pipeline-trained model.
        print(f"sample: {len(prompts)} generations skipped: a pipeline-parallel model "
              "(parallelism.pipeline_stages > 1) does not generate; export it and generate from the export",
              flush=True)
        samples_skipped, prompts = len(prompts), []
    samples = generate_samples(engine, tokenizer, prompts, ctx, recipe) if prompts else []
    summary = {
        "steps": steps,
        "tokens": tokens_seen,
        "elapsed_s": elapsed_before + time.time() - start,
        "final_loss": record["loss"] if record["loss"] is not None else _last_loss(run_dir),
        "eval_loss": last_eval,
        "world_size": ctx.world_size,
        "resumed_from_step": start_step if resumed_from is not None else None,
        "peak_memory_bytes": _peak_memory(ctx),
    }
    if samples_skipped:
        summary["samples_skipped"] = samples_skipped
    if writer:
        writer.log({"event": "end", **summary})
        writer.close()
        with open(run_dir / SAMPLES_FILE, "w") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        if ck.export_hf_at_end and final_dir is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            from launcher.checkpoint.export import export_checkpoint

            # The export builds the model on the meta device; with ZeRO-3's config still active
            # transformers would build it inside zero.Init, collectively, on rank 0 alone (a hang).
            unset_hf_deepspeed_config()

            summary["hf_export"] = str(run_dir / "hf")
            export_checkpoint(final_dir, run_dir / "hf", recipe=recipe, dtype=recipe.model.dtype
                              if recipe.model.dtype != "fp16" else "fp16")
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    return summary


def _save_if_time(save: Any, ckpt: Any, step: int, deadline: float | None, now: float) -> str | None:
    """Save at a stop request if the last save fits in what is left of the notice window."""
    from launcher.checkpoint.layout import step_tag

    left = (deadline - now) if deadline is not None else None
    from launcher.checkpoint.checkpointer import broadcast

    # every rank must take the same decision: rank 0's view is broadcast
    if not broadcast(left is None or ckpt.last_save_s is None or ckpt.last_save_s * 1.5 < left):
        return None
    save(step)
    return step_tag(step)


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics of steps after the checkpoint being resumed: they will be trained again."""
    from launcher.checkpoint.layout import atomic_write_text
    from launcher.runtime.metrics import METRICS_FILE, read_metrics

    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step and r.get("event") not in ("end", "preempted")]
    if step == 0:
        keep = []
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _last_loss(run_dir: Path) -> float | None:
    from launcher.runtime.metrics import METRICS_FILE, read_metrics

    losses = [r["loss"] for r in read_metrics(run_dir / METRICS_FILE) if r.get("loss") is not None and not r.get("eval")]
    return losses[-1] if losses else None


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    """A scheduler state dict without its (unpicklable, recreated) lambdas."""
    return {k: v for k, v in state.items() if k != "lr_lambdas"}


def _peak_memory(ctx: WorkerContext) -> int:
    """Peak bytes on this rank's device (CUDA allocator) or of this process (RSS), max over ranks."""
    if ctx.on_gpu:
        mine = torch.cuda.max_memory_allocated(ctx.device)
    else:
        import resource

        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = torch.tensor([float(mine)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _plain_grad_norm(engine: Any) -> float:
    """Global 2-norm of the (already all-reduced) gradients, before clipping: ZeRO-0 only."""
    norms = [p.grad.detach().double().norm() for p in engine.module.parameters() if p.grad is not None]
    # one device-to-host copy per step, not one per parameter
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _log_eval(engine, examples, ctx, recipe, pad_id, writer, step) -> float:
    if recipe.parallelism.pipeline_stages > 1:
        loss = evaluate_pipeline(engine, examples, ctx, recipe, pad_id)
    else:
        loss = evaluate(engine, examples, ctx, recipe, pad_id)
    if writer:
        writer.log({"step": step, "eval": True, "eval_loss": loss})
    return loss
