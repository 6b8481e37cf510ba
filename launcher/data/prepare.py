"""Prepare the recipe's data once: read with `datasets`, tokenize on every core, write
memory-mapped token files under `data.cache_dir`, committed atomically (see cache.py).

`prepare_datasets(recipe, tokenizer)` is what `launcher data prepare` and `launcher run` call:
each source (the single `data.path`/`data.hub`/`data.synthetic`, or every `data.sources`
entry, and `data.eval_path`) is looked up by its fingerprint and prepared only when missing.
The result is a `DataSplits` whose splits are `PreparedSplit`s (or a `MixedSplit` of them):
they index like the in-memory lists, and pickle as paths.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from launcher.data import cache, encode, formats, preference
from launcher.data.formats import Counts
from launcher.data.holdout import by_sequences, held_out
from launcher.data.mixture import MixedSplit, mixture_counts
from launcher.data.store import PreparedSplit, SplitWriter, write_json
from launcher.data.writer import write_split
from launcher.errors import DataError
from launcher.recipe.sections import DataConfig, Recipe

MAX_EVAL_PROMPTS = 64
ROWS_PER_BATCH = 1000
ROWS_PER_PROCESS = 2000
"""Fewer rows than this per extra process: tokenize in this process (starting one costs more)."""


@dataclass
class SourcePlan:
    """One data set to prepare: a single-source view of the recipe's data section."""

    key: str
    """Recipe key it comes from, for messages: `data.path`, `data.sources[1].path`, ..."""
    data: DataConfig
    columns: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    weight: float | None = None
    epochs: float | None = None
    eval_only: bool = False
    task: str = "sft"
    """`train.task`: preference tasks (dpo, orpo, kto) read pairs or labelled responses."""


@dataclass
class Prepared:
    path: Path
    manifest: dict[str, Any]
    cache_hit: bool


Progress = Callable[[dict[str, Any]], None]
"""Hears `{"event": "start"|"progress"|"done", "source", "rows", "tokens", ...}`."""


def plan_sources(data: DataConfig) -> list[SourcePlan]:
    """The data sets `data` names, each as a single-source DataConfig (`sources` cleared)."""
    if not data.sources:
        key = "data.path" if data.path else "data.hub" if data.hub else "data.synthetic"
        plans = [SourcePlan(key, dataclasses.replace(data, eval_path=[]))]
    else:
        plans = []
        for i, s in enumerate(data.sources):
            key = f"data.sources[{i}]." + ("path" if s.path else "hub" if s.hub else "synthetic")
            view = dataclasses.replace(
                data, sources=[], eval_path=[], path=s.path, hub=s.hub, hub_config=s.hub_config, hub_revision=s.hub_revision,
                hub_split=s.split, streaming=s.streaming, synthetic=s.synthetic,
                format=s.format or data.format, sample_by=s.sample_by or data.sample_by,
            )
            plans.append(SourcePlan(key, view, dict(s.columns), dict(s.roles), s.weight, s.epochs))
    if data.eval_path:
        view = dataclasses.replace(data, sources=[], eval_path=[], path=data.eval_path, hub=None, synthetic=None,
                                   streaming=False, eval_fraction=0.0)
        plans.append(SourcePlan("data.eval_path", view, eval_only=True))
    return plans


def _source_identity(d: DataConfig) -> Any:
    if d.synthetic is not None:
        from launcher.data.synthetic import GENERATOR_VERSIONS

        version = GENERATOR_VERSIONS.get(d.synthetic.task)
        return {"synthetic": dataclasses.asdict(d.synthetic), **({"version": version} if version else {})}
    if d.hub:
        return {"hub": d.hub, "config": d.hub_config, "revision": _hub_revision(d), "split": d.hub_split}
    return {"files": [cache.file_identity(Path(p).expanduser()) for p in d.path if Path(p).expanduser().exists()]}


def _hub_revision(d: DataConfig) -> str | None:
    """The commit a hub revision (or the default branch) points at now, so that a dataset
    updated on the hub is prepared again; the revision as written when the hub is unreachable."""
    from launcher.pretrained import offline

    if offline() or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return d.hub_revision
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(d.hub, revision=d.hub_revision, timeout=10).sha or d.hub_revision
    except Exception:
        return d.hub_revision


def fingerprint_inputs(plan: SourcePlan, seed: int, tokenizer: Any) -> dict[str, Any]:
    d = plan.data
    return {
        "source": _source_identity(d),
        "format": d.format, "sample_by": d.sample_by, "columns": plan.columns, "roles": plan.roles,
        "tokenizer": cache.tokenizer_identity(tokenizer),
        "max_seq_len": d.max_seq_len, "packing": d.packing, "mask_prompt": d.mask_prompt,
        "prompt_template": d.prompt_template, "skip_malformed": d.skip_malformed,
        "eval_fraction": d.eval_fraction, "seed": seed if d.eval_fraction else None,
    } | ({"task": plan.task} if preference.kind(plan.task) else {})  # fmt: skip


def prepare_source(plan: SourcePlan, recipe: Recipe, tokenizer: Any, progress: Progress | None = None) -> Prepared:
    """The prepared data set of `plan`: from the cache, or prepared now and committed."""
    root = cache.cache_root(recipe.data.cache_dir)
    plan = dataclasses.replace(plan, task=recipe.train.task)
    inputs = fingerprint_inputs(plan, recipe.train.seed, tokenizer)
    fp = cache.fingerprint(inputs)
    found = cache.lookup(root, fp)
    if found is not None:
        manifest = json.loads((found / cache.MANIFEST).read_text())
        if progress:
            progress({"event": "cached", "source": plan.key, "path": str(found), **manifest["stats"]})
        return Prepared(found, manifest, cache_hit=True)
    cache.remove_stale_staging(root)
    start = time.monotonic()
    with cache.staging(root, fp) as stage:
        stats = _build(plan, recipe, tokenizer, stage, progress)
        stats["seconds"] = round(time.monotonic() - start, 3)
        manifest = {"inputs": inputs, "source_key": plan.key, "stats": stats}
        path = cache.commit(stage, root, fp, manifest)
    manifest = json.loads((path / cache.MANIFEST).read_text())
    if progress:
        progress({"event": "done", "source": plan.key, "path": str(path), **manifest["stats"]})
    return Prepared(path, manifest, cache_hit=False)


def _build(plan: SourcePlan, recipe: Recipe, tokenizer: Any, stage: Path, progress: Progress | None) -> dict:
    import datasets

    from launcher.data.sources import rows_dataset

    d = plan.data
    hf_cache = stage / "hf-cache"
    ds, names, unparsable = rows_dataset(d, plan.key, str(hf_cache))
    streaming = isinstance(ds, datasets.IterableDataset)
    eval_ds, seq_holdout = None, False
    if d.eval_fraction:
        if streaming or by_sequences(d, len(ds)):
            seq_holdout = True
        else:
            picked = held_out(len(ds), d.eval_fraction, recipe.train.seed)
            if len(picked) >= len(ds):
                raise DataError(
                    f"data.eval_fraction: {len(ds)} rows are too few to hold out {d.eval_fraction}: "
                    "lower it, or give separate eval files in data.eval_path"
                )
            chosen = np.zeros(len(ds), dtype=bool)
            chosen[picked] = True
            eval_ds = ds.select(np.flatnonzero(chosen))
            ds = ds.select(np.flatnonzero(~chosen))
    counts = Counts(rows=unparsable, skipped_malformed=unparsable)
    if unparsable:
        counts.skipped_by_reason["not valid JSON"] = unparsable
    vocab = len(tokenizer)
    split_info = {}
    for name, part in (("train", ds), ("eval", eval_ds)):
        if part is None:
            continue
        writer = SplitWriter(stage / name, vocab, packed=d.packing, kind=preference.kind(plan.task))
        part_stats = _tokenize_into(part, writer, plan, tokenizer, names, hf_cache, progress)
        split_info[name] = writer.close()
        counts.add(encode.counts_from(part_stats))
    if seq_holdout:
        n = split_info["train"]["examples"]
        if n < 2:
            raise DataError(f"{plan.key}: {n} sequence(s) are too few to hold out evaluation data: "
                            "give more data, or set data.eval_fraction=0")
        eval_idx = np.array(held_out(n, d.eval_fraction, recipe.train.seed), dtype=np.int64)
        train_mask = np.ones(n, dtype=bool)
        train_mask[eval_idx] = False
        np.save(stage / "train_index.npy", np.flatnonzero(train_mask).astype(np.int64))
        np.save(stage / "eval_index.npy", eval_idx)
    held = ds if plan.eval_only else eval_ds  # an eval_path data set is all evaluation
    prompts = _eval_prompts(held, plan, tokenizer, names) if d.format != "text" and held is not None else []
    write_json(stage / "eval_prompts.json", prompts)
    shutil.rmtree(hf_cache, ignore_errors=True)
    stats = dataclasses.asdict(counts) | {
        "train_tokens": split_info["train"]["label_tokens"], "tokens": sum(s["tokens"] for s in split_info.values()),
        "examples": split_info["train"]["examples"], "held_out": "sequences" if seq_holdout else "rows",
        "bytes": sum(p.stat().st_size for p in stage.rglob("*") if p.is_file()),
    }  # fmt: skip
    return stats


_COUNTER: Any = None
"""Rows and tokens done, shared with the forked tokenizing processes for the progress display."""


def _tokenize_into(part: Any, writer: SplitWriter, plan: SourcePlan, tokenizer: Any, names: list[str],
                   hf_cache: Path, progress: Progress | None) -> list[str]:
    import datasets

    global _COUNTER
    d = plan.data
    kwargs = dict(tokenizer=tokenizer, data=d, names=names, columns=plan.columns, roles=plan.roles, task=plan.task)
    drop = part.column_names
    if isinstance(part, datasets.IterableDataset):
        if drop is None:  # a streamed dataset's columns are known once a row is read
            drop = list(next(iter(part.take(1)), {}).keys())
        mapped = part.map(encode.encode_batch, batched=True, batch_size=ROWS_PER_BATCH,
                          remove_columns=drop, fn_kwargs=kwargs)
        batches = mapped.with_format("arrow").iter(batch_size=ROWS_PER_BATCH)
    else:
        procs = min(d.num_proc or os.cpu_count() or 1, max(1, len(part) // ROWS_PER_PROCESS))
        # Fork-based processes and the tokenizers library's own threads do not mix: each process
        # tokenizes its batches single-threaded, one process per core.
        os.environ["TOKENIZERS_PARALLELISM"] = "false" if procs > 1 else "true"
        _COUNTER = multiprocessing.Array("q", 2) if progress else None
        from launcher.data.sources import _quiet

        with _quiet(), _reporting(progress, f"{plan.key} ({writer.path.name})", len(part)):
            mapped = part.map(
                _encode_counted, batched=True, batch_size=ROWS_PER_BATCH, num_proc=procs if procs > 1 else None,
                remove_columns=drop, fn_kwargs=kwargs, cache_file_name=str(hf_cache / f"tok-{writer.path.name}.arrow"),
                load_from_cache_file=False,
            )  # fmt: skip
        batches = mapped.with_format("arrow").iter(batch_size=10 * ROWS_PER_BATCH)
    return write_split(batches, writer, text=d.format == "text", packing=d.packing, max_seq_len=d.max_seq_len)


def _encode_counted(batch: dict[str, list], **kwargs: Any) -> dict[str, list]:
    out = encode.encode_batch(batch, **kwargs)
    if _COUNTER is not None:
        with _COUNTER.get_lock():
            _COUNTER[0] += len(batch["_row"])
            _COUNTER[1] += sum(len(x) for x in out["input_ids"])
    return out


class _reporting:
    """While `map` runs: a thread reads the shared counter and tells `progress`."""

    def __init__(self, progress: Progress | None, source: str, total: int) -> None:
        self.progress, self.source, self.total = progress, source, total

    def __enter__(self) -> None:
        import threading

        if self.progress is None:
            return
        self.stop = threading.Event()
        self.start = time.monotonic()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _tell(self) -> None:
        rows, tokens = _COUNTER[0], _COUNTER[1]
        self.progress({"event": "progress", "source": self.source, "rows": rows, "total_rows": self.total,
                       "tokens": tokens, "seconds": time.monotonic() - self.start})

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            self._tell()

    def __exit__(self, *exc: Any) -> None:
        if self.progress is None:
            return
        self.stop.set()
        self.thread.join()
        self._tell()


def _eval_prompts(eval_ds: Any, plan: SourcePlan, tokenizer: Any, names: list[str]) -> list[dict]:
    head = eval_ds.select(range(min(len(eval_ds), 4 * MAX_EVAL_PROMPTS)))[:]
    counts = Counts()
    data = dataclasses.replace(plan.data, skip_malformed=True)
    rows = encode.batch_rows(head, names, plan.columns, plan.roles)
    pref = preference.kind(plan.task) is not None
    items = preference.normalize(rows, data, plan.task, counts) if pref else formats.normalize(rows, data, counts)
    prompts = []
    for item in items:
        if len(prompts) == MAX_EVAL_PROMPTS:
            break
        p = preference.generation_prompt(item, tokenizer) if pref else formats.generation_prompt(item, tokenizer, plan.data)
        if p is not None:
            prompts.append(p)
    return prompts


def open_splits(prepared: Prepared) -> tuple[PreparedSplit, PreparedSplit | None]:
    path = prepared.path
    if (path / "eval_index.npy").exists():
        train = PreparedSplit(path / "train", np.load(path / "train_index.npy", allow_pickle=False))
        return train, PreparedSplit(path / "train", np.load(path / "eval_index.npy", allow_pickle=False))
    return PreparedSplit(path / "train"), PreparedSplit(path / "eval") if (path / "eval").is_dir() else None


def prepare_datasets(recipe: Recipe, tokenizer: Any, progress: Progress | None = None) -> Any:
    """Every source of the recipe prepared (or found in the cache) and opened by memory map."""
    from launcher.data.pipeline import DataSplits

    plans = plan_sources(recipe.data)
    prepared = [prepare_source(p, recipe, tokenizer, progress) for p in plans]
    trains, evals, prompts, counts = [], [], [], Counts()
    for plan, prep in zip(plans, prepared):
        train, evaluation = open_splits(prep)
        if plan.eval_only:
            evals.append(train)
        else:
            trains.append((plan, train))
            if evaluation is not None:
                evals.append(evaluation)
        stats = prep.manifest["stats"]
        counts.add(Counts(**{k: stats[k] for k in ("rows", "skipped_malformed", "truncated",
                                                   "dropped_no_labels", "skipped_by_reason")}))
        prompts += json.loads((prep.path / "eval_prompts.json").read_text())
    if len(trains) == 1 and trains[0][0].weight is None and trains[0][0].epochs is None:
        train = trains[0][1]
    else:
        sizes = [len(t) for _, t in trains]
        shares = mixture_counts(sizes, [p.weight for p, _ in trains], [p.epochs for p, _ in trains])
        train = MixedSplit([t for _, t in trains], shares, recipe.train.seed)
    evaluation = evals[0] if len(evals) == 1 else MixedSplit(evals, [len(e) for e in evals], 0)
    if not len(train):
        raise DataError(
            f"no training examples left out of {counts.rows} rows ({counts.skipped_malformed} "
            f"malformed, {counts.dropped_no_labels} with the response cut off by "
            f"data.max_seq_len={recipe.data.max_seq_len}): check the data, or raise data.max_seq_len"
        )
    stats = dataclasses.asdict(counts) | {
        "train_examples": len(train), "eval_examples": len(evaluation) if evaluation is not None else 0,
        "train_tokens": train.label_tokens(),
        "prepared": [{"source": plan.key, "path": str(p.path), "cache_hit": p.cache_hit} for plan, p in zip(plans, prepared)],
    }  # fmt: skip
    return DataSplits(train=train, eval=evaluation if evaluation is not None else [],
                      eval_prompts=prompts[:MAX_EVAL_PROMPTS], stats=stats)
