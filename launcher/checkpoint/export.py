"""Export a DeepSpeed checkpoint step to a Hugging Face model directory (safetensors shards,
index, config, generation config, tokenizer), one tensor in memory at a time."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from launcher.checkpoint.safetensors_stream import (
    INDEX_FILE,
    ShardWriter,
    TensorSpec,
    plan_shards,
    shard_names,
    write_index,
)
from launcher.checkpoint.zero_reader import REMAP_BYTES, iter_full_params, read_buffers, read_meta
from launcher.errors import UserError

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

Progress = Callable[[int, int], None]
"""progress(bytes_written, total_bytes), called after every tensor."""


def _tied(config: Any) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


def _expected_state(config: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes `from_pretrained` will look for: the model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_matches(meta: Any, config: Any, names: dict[str, tuple[int, ...]], step_dir: Path) -> None:
    if meta.shared_params and not _tied(config):
        alias, src = next(iter(meta.shared_params.items()))
        raise UserError(
            f"{step_dir}: {alias} was tied to {src} in training but the recipe's model config has "
            "tie_word_embeddings false: export with the recipe the checkpoint was trained with"
        )
    expected = _expected_state(config)
    have = dict(names)
    for alias, src in meta.shared_params.items():
        have.setdefault(alias, meta.param_shapes.get(src, ()))
    missing = [k for k in expected if k not in have]
    wrong = [k for k in expected if k in have and tuple(have[k]) != expected[k]]
    extra = [k for k in names if k not in expected]
    if missing or wrong or extra:
        if missing:
            what = f"the model needs {missing[0]} but the checkpoint has no such tensor"
        elif wrong:
            k = wrong[0]
            what = f"{k} is {list(have[k])} in the checkpoint but {list(expected[k])} in the model"
        else:
            what = f"the checkpoint has {extra[0]}, which the model does not"
        raise UserError(
            f"{step_dir}: does not match the run's recipe.yaml ({what}, and "
            f"{len(missing) + len(wrong) + len(extra) - 1} more differences): export with the recipe "
            "the checkpoint was trained with"
        )


def export_checkpoint(
    step_dir: Path,
    out: Path,
    *,
    recipe: Any,
    dtype: str = "bf16",
    max_shard_size: str | int = "5GB",
    progress: Progress | None = None,
    remap_bytes: int = REMAP_BYTES,
    trust_remote_code: bool = False,
    merge: bool = False,
) -> dict[str, Any]:
    """Write the checkpoint at `step_dir` to `out` as a Hugging Face model directory.

    `recipe` is the run's Recipe, or the path of its recipe.yaml. Its `model.trust_remote_code`
    is ignored: code shipped with a model runs only with `trust_remote_code=True`, which the CLI
    sets from `--trust-remote-code` alone (a run directory may come from anyone). Peak memory is about one full
    fp32 tensor plus its converted copy, whatever the model's size. The tensors are written by a
    background thread (file I/O, which releases the GIL) while this one loads transformers and
    builds the config and tokenizer; a checkpoint that does not match the recipe's model is
    refused and whatever was written is removed. Returns a summary (files, total_bytes, params,
    tensors, seconds, ...).

    A LoRA run's checkpoint (`train.method: lora | qlora`) is exported as its adapter in PEFT's
    format, or with `merge` as the merged model (`launcher.checkpoint.export_lora`); `merge` of
    a full fine-tuning checkpoint is refused.
    """
    start = time.perf_counter()
    step_dir, out = Path(step_dir), Path(out)
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    target = EXPORT_DTYPES[dtype]
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty: choose a new --out directory or delete it")

    from launcher.checkpoint.export_lora import export_lora, is_lora_checkpoint
    from launcher.checkpoint.zero_reader import pipeline_layer_files

    if not pipeline_layer_files(step_dir) and is_lora_checkpoint(step_dir):
        return export_lora(step_dir, out, recipe=recipe, dtype=dtype, merge=merge, max_shard_size=max_shard_size,
                           trust_remote_code=trust_remote_code)
    if merge:
        raise UserError(f"{step_dir}: --merge applies to LoRA runs (train.method: lora | qlora); this checkpoint "
                        "has no adapters: export it without --merge")
    if pipeline_layer_files(step_dir):
        return _export_pipeline(step_dir, out, recipe=recipe, dtype=dtype, max_shard_size=max_shard_size,
                                progress=progress, start=start, trust_remote_code=trust_remote_code)
    return _export_zero(step_dir, out, recipe=recipe, target=target, dtype=dtype, max_shard_size=max_shard_size,
                        progress=progress, remap_bytes=remap_bytes, trust_remote_code=trust_remote_code,
                        start=start)


def _export_zero(step_dir: Path, out: Path, *, recipe: Any, target: torch.dtype, dtype: str,
                 max_shard_size: str | int, progress: Progress | None, remap_bytes: int,
                 trust_remote_code: bool, start: float) -> dict[str, Any]:
    """A ZeRO 0-3 (non-pipeline) checkpoint as safetensors shards, written by a background thread
    while this one builds the config and checks that the checkpoint matches it."""
    meta = read_meta(step_dir)
    buffers = read_buffers(step_dir)
    # Tensors in model order. A tied alias (meta.shared_params) shares its source's data in the
    # trained model, and `from_pretrained` ties it again from the config: it is not written.
    names = list(meta.param_shapes) + list(buffers)
    shapes = {**meta.param_shapes, **{n: tuple(b.shape) for n, b in buffers.items()}}

    def out_dtype(name: str) -> torch.dtype:
        if name in buffers and not buffers[name].is_floating_point():
            return buffers[name].dtype
        return target

    specs = [TensorSpec(name, shapes[name], out_dtype(name)) for name in names]
    plan = plan_shards(specs, max_shard_size)
    files = shard_names(len(plan))
    total = sum(s.nbytes for s in specs)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)

    failure: list[BaseException] = []
    writer = threading.Thread(
        target=_write_shards,
        args=(step_dir, out, files, plan, buffers, progress, total, remap_bytes, failure),
        name="export-writer",
        daemon=True,
    )
    writer.start()
    try:
        recipe, config, tokenizer = _recipe_config(recipe, trust_remote_code)
        _check_matches(meta, config, shapes, step_dir)
    except BaseException:
        writer.join()
        _remove(out, created, files)
        raise
    writer.join()
    if failure:
        _remove(out, created, files)
        raise failure[0]

    n_params = sum(torch.Size(meta.param_shapes[n]).numel() for n in meta.param_shapes)
    return _finish(step_dir, out, files, plan, specs, n_params, config, target, tokenizer, dtype=dtype,
                   total=total, start=start, zero_stage=meta.zero_stage, dp_world_size=meta.dp_world_size,
                   global_steps=meta.global_steps)


def _export_pipeline(step_dir: Path, out: Path, *, recipe: Any, dtype: str, max_shard_size: str | int,
                     progress: Progress | None, start: float, trust_remote_code: bool) -> dict[str, Any]:
    """Export a pipeline-parallel checkpoint: every `layer_XX` file's tensors under their Hugging
    Face names (`launcher.runtime.pipeline.pipeline_layers`); a tied LM head is not written (the
    pipeline saves none: `from_pretrained` ties it to the embedding again)."""
    from types import SimpleNamespace

    from launcher.checkpoint.zero_reader import pipeline_layer_files, read_pipeline_layer
    from launcher.runtime.pipeline import hf_state_name, pipeline_layers

    target = EXPORT_DTYPES[dtype]
    recipe, config, tokenizer = _recipe_config(recipe, trust_remote_code)
    layers = pipeline_layers(config)
    files_by_layer = pipeline_layer_files(step_dir)
    wanted = [i for i, layer in enumerate(layers) if not layer.tied]
    if sorted(files_by_layer) != wanted:
        raise UserError(
            f"{step_dir}: has pipeline layer files {sorted(files_by_layer)} but the recipe's model has "
            f"layers {wanted}: export with the recipe the checkpoint was trained with"
        )
    names: dict[str, tuple[str, int]] = {}  # hf name -> (key in the layer file, layer)
    specs = []
    for i in wanted:
        for key, t in read_pipeline_layer(files_by_layer[i]).items():
            hf = hf_state_name(layers[i], key)
            if hf is None or hf in names:
                continue
            names[hf] = (key, i)
            specs.append(TensorSpec(hf, tuple(t.shape), target if t.is_floating_point() else t.dtype))
    shapes = {s.name: s.shape for s in specs}
    shared = {"lm_head.weight": layers[0].hf_prefix + "weight"} if any(layer.tied for layer in layers) else {}
    _check_matches(SimpleNamespace(shared_params=shared, param_shapes=shapes), config, shapes, step_dir)

    plan = plan_shards(specs, max_shard_size)
    files = shard_names(len(plan))
    total = sum(s.nbytes for s in specs)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        done, cache = 0, {}
        for fname, shard in zip(files, plan):
            with ShardWriter(out / fname, shard) as w:
                for spec in shard:
                    key, i = names[spec.name]
                    if i not in cache:  # one layer's file mapped at a time
                        cache = {i: read_pipeline_layer(files_by_layer[i])}
                    t = cache[i][key]
                    w.write(spec.name, t.to(spec.dtype) if t.dtype != spec.dtype else t)
                    done += spec.nbytes
                    if progress:
                        progress(done, total)
        del cache
    except BaseException:
        _remove(out, created, files)
        raise
    n_params = sum(torch.Size(s.shape).numel() for s in specs)
    return _finish(step_dir, out, files, plan, specs, n_params, config, target, tokenizer, dtype=dtype,
                   total=total, start=start, pipeline_stages=getattr(recipe.parallelism, "pipeline_stages", None))


def _recipe_config(recipe: Any, trust_remote_code: bool) -> tuple[Any, Any, Any]:
    """The recipe, its model config and tokenizer, with `trust_remote_code` as the caller says
    (never the recipe's)."""
    from dataclasses import replace

    if not hasattr(recipe, "model"):
        from launcher.recipe import load_recipe

        recipe = load_recipe(recipe)
    from launcher.data import build_tokenizer
    from launcher.errors import RecipeError
    from launcher.runtime.model import model_config

    model = replace(recipe.model, trust_remote_code=trust_remote_code)
    try:
        tokenizer = build_tokenizer(recipe.tokenizer, model.name_or_path, trust_remote_code=trust_remote_code)
        return recipe, model_config(model, tokenizer), tokenizer
    except (UserError, RecipeError) as e:
        if trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise UserError(
            f"{model.name_or_path}: the model ships its own code, which the export runs only when "
            "asked: pass --trust-remote-code if you trust that code (the run's recipe.yaml is not "
            "taken as consent)"
        ) from None


def _finish(step_dir: Path, out: Path, files: list[str], plan: Any, specs: list[Any], n_params: int, config: Any,
            target: torch.dtype, tokenizer: Any, *, dtype: str, total: int, start: float,
            **extra: Any) -> dict[str, Any]:
    """Write the index, config and tokenizer next to the shards; the export's summary."""
    _write_config(out, files, plan, n_params, config, target, tokenizer)
    return {
        "step_dir": str(step_dir),
        "out": str(out),
        "dtype": dtype,
        "files": files + [INDEX_FILE],
        "tensors": len(specs),
        "params": n_params,
        "total_bytes": total,
        "tied_embeddings": _tied(config),
        **extra,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _write_config(out: Path, files: list[str], plan: Any, n_params: int, config: Any, target: torch.dtype,
                  tokenizer: Any) -> None:
    from transformers import GenerationConfig

    write_index(out, dict(zip(files, plan)), total_parameters=n_params)
    config.dtype = target
    config.save_pretrained(out)
    try:
        gen = GenerationConfig.from_model_config(config)
        if gen.to_diff_dict():
            gen.save_pretrained(out)
    except (ValueError, TypeError):
        pass  # a config that makes no valid generation config: from_pretrained uses defaults
    tokenizer.save_pretrained(out)


EXPORT_THREADS = 4
"""Tensors read (pread from the ranks' shards), cast and written (pwrite at their offsets) at
once: the reads of one overlap the writes of another."""


def _write_shards(step_dir, out, files, plan, buffers, progress, total, remap_bytes, failure) -> None:
    """The writer thread: every shard's header, then its tensors. Trainable parameters are read
    and written by `EXPORT_THREADS` threads, each tensor at its place in its file, with at most
    `budget` bytes of tensors in memory at once; the rest (buffers, frozen weights, stage 0) in
    order by this thread. An error goes to `failure`."""
    from launcher.checkpoint.zero_layout import layout

    writers: list[ShardWriter] = []
    try:
        lay = layout(step_dir)
        writers = [ShardWriter(out / fname, shard) for fname, shard in zip(files, plan)]
        items = [(w, spec) for w, shard in zip(writers, plan) for spec in shard]
        parallel = [(w, spec) for w, spec in items if spec.name in lay.frags and spec.name not in buffers]
        serial = [(w, spec) for w, spec in items if (w, spec) not in set(parallel)]
        done = _Counter(progress, total)
        wanted = [spec.name for _, spec in serial if spec.name not in buffers]
        params = iter_full_params(step_dir, wanted, remap_bytes=remap_bytes) if wanted else iter(())
        for w, spec in serial:
            t = buffers[spec.name] if spec.name in buffers else next(params)[1]
            w.write_at(spec.name, t.to(spec.dtype) if t.dtype != spec.dtype else t)
            done.add(spec.nbytes)
        _parallel_writes(lay, parallel, done)
        for w in writers:
            w.close()
    except BaseException as e:  # noqa: BLE001  (re-raised by the caller)
        for w in writers:
            w.abort()
        failure.append(e)


class _Counter:
    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if self.progress:
                self.progress(self.done, self.total)


def _parallel_writes(lay: Any, items: list, done: _Counter) -> None:
    """Gather (full fp32), cast and pwrite each tensor of `items` on a pool of threads, each
    with its own view of the shard files; memory held by tensors in flight stays under a budget
    of twice the largest one (or 256 MiB)."""
    from concurrent.futures import ThreadPoolExecutor

    from launcher.checkpoint.offset_reads import ShardSlices

    if not items:
        return
    local = threading.local()
    sizes = {spec.name: torch.Size(spec.shape).numel() * (4 + spec.nbytes // max(1, torch.Size(spec.shape).numel()))
             for _, spec in items}
    budget = _Budget(max(2 * max(sizes.values()), 256 * 1024**2))
    opened: list[Any] = []

    def one(item: tuple[ShardWriter, Any]) -> None:
        w, spec = item
        if not hasattr(local, "slices"):
            local.slices = ShardSlices(lay, REMAP_BYTES)
            opened.append(local.slices)
        with budget.hold(sizes[spec.name]):
            t = local.slices.gather(spec.name, "fp32")
            w.write_at(spec.name, t.to(spec.dtype) if t.dtype != spec.dtype else t)
            del t
        done.add(spec.nbytes)

    try:
        with ThreadPoolExecutor(EXPORT_THREADS, thread_name_prefix="export") as pool:
            for f in [pool.submit(one, it) for it in items]:
                f.result()
    finally:
        for s in opened:
            s.reset()


class _Budget:
    """Bytes of tensors in flight: a thread waits while taking its share would pass the limit
    (one tensor larger than the limit may always go alone)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._cv = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int):
        with self._cv:
            self._cv.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.limit)
            self.used += nbytes
        try:
            yield
        finally:
            with self._cv:
                self.used -= nbytes
                self._cv.notify_all()


def _remove(out: Path, created: bool, files: list[str]) -> None:
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in files:
        for p in (out / name, out / f"{name}.tmp"):
            p.unlink(missing_ok=True)
