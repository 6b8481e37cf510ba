"""Export a DeepSpeed checkpoint step to a Hugging Face model directory (safetensors shards,
index, config, generation config, tokenizer), one tensor in memory at a time."""

from __future__ import annotations

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
) -> dict[str, Any]:
    """Write the checkpoint at `step_dir` to `out` as a Hugging Face model directory.

    `recipe` is the run's Recipe, or the path of its recipe.yaml. Peak memory is about one full
    fp32 tensor plus its converted copy, whatever the model's size. The tensors are written by a
    background thread (file I/O, which releases the GIL) while this one loads transformers and
    builds the config and tokenizer; a checkpoint that does not match the recipe's model is
    refused and whatever was written is removed. Returns a summary (files, total_bytes, params,
    tensors, seconds, ...).
    """
    start = time.perf_counter()
    step_dir, out = Path(step_dir), Path(out)
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    target = EXPORT_DTYPES[dtype]
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty: choose a new --out directory or delete it")

    from launcher.checkpoint.zero_reader import pipeline_layer_files

    if pipeline_layer_files(step_dir):
        return _export_pipeline(step_dir, out, recipe=recipe, dtype=dtype, max_shard_size=max_shard_size,
                                progress=progress, start=start)
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
        recipe, config, tokenizer = _recipe_config(recipe)
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
                     progress: Progress | None, start: float) -> dict[str, Any]:
    """Export a pipeline-parallel checkpoint: every `layer_XX` file's tensors under their Hugging
    Face names (`launcher.runtime.pipeline.pipeline_layers`); a tied LM head is not written (the
    pipeline saves none: `from_pretrained` ties it to the embedding again)."""
    from types import SimpleNamespace

    from launcher.checkpoint.zero_reader import pipeline_layer_files, read_pipeline_layer
    from launcher.runtime.pipeline import hf_state_name, pipeline_layers

    target = EXPORT_DTYPES[dtype]
    recipe, config, tokenizer = _recipe_config(recipe)
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


def _recipe_config(recipe: Any) -> tuple[Any, Any, Any]:
    if not hasattr(recipe, "model"):
        from launcher.recipe import load_recipe

        recipe = load_recipe(recipe)
    from launcher.data import build_tokenizer
    from launcher.runtime.model import model_config

    tokenizer = build_tokenizer(recipe.tokenizer, recipe.model.name_or_path,
                                trust_remote_code=recipe.model.trust_remote_code)
    return recipe, model_config(recipe.model, tokenizer), tokenizer


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


def _write_shards(step_dir, out, files, plan, buffers, progress, total, remap_bytes, failure) -> None:
    """The writer thread: every shard, tensor by tensor, in plan order; an error goes to `failure`."""
    try:
        wanted = [s.name for shard in plan for s in shard if s.name not in buffers]
        params = iter_full_params(step_dir, wanted, remap_bytes=remap_bytes)
        done = 0
        for fname, shard in zip(files, plan):
            with ShardWriter(out / fname, shard) as w:
                for spec in shard:
                    if spec.name in buffers:
                        t = buffers[spec.name]
                    else:
                        name, t = next(params)
                        assert name == spec.name
                    w.write(spec.name, t.to(spec.dtype) if t.dtype != spec.dtype else t)
                    del t
                    done += spec.nbytes
                    if progress:
                        progress(done, total)
    except BaseException as e:  # noqa: BLE001  (re-raised by the caller)
        failure.append(e)


def _remove(out: Path, created: bool, files: list[str]) -> None:
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in files:
        for p in (out / name, out / f"{name}.tmp"):
            p.unlink(missing_ok=True)
