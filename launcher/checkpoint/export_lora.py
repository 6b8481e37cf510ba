"""Export a LoRA run's checkpoint (`train.method: lora | qlora`): the adapter in PEFT's format
(`adapter_model.safetensors` + `adapter_config.json`, for `peft.PeftModel.from_pretrained`), or
with `merge` the merged model as Hugging Face safetensors shards.

The checkpoint holds the PeftModel's parameters: the adapters and `modules_to_save` copies as
fp32 masters, the frozen base as saved module weights (ZeRO-3: every rank's
`frozen_param_fragments`), all read by `zero_reader` one tensor at a time. A base built from
`model.config` (random init) exists nowhere else, so the adapter export also writes it to
`OUT/base/` as a Hugging Face model; a pretrained base is named in `adapter_config.json`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from launcher.checkpoint.safetensors_stream import ShardWriter, TensorSpec, plan_shards, shard_names
from launcher.checkpoint.zero_reader import iter_full_params, read_buffers, read_meta
from launcher.errors import UserError

PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])\.default(?:\.weight)?$")


def is_lora_checkpoint(step_dir: Path) -> bool:
    return any(".lora_A." in n or ".lora_embedding_A." in n for n in read_meta(step_dir).param_shapes)


def hf_name(name: str) -> str | None:
    """The plain model's name of a PeftModel parameter; None for adapters and for the frozen
    original of a `modules_to_save` module (its trained copy replaces it)."""
    if _LORA.match(name) or ".original_module." in name:
        return None
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def base_name(name: str) -> str | None:
    """The base model's name of a PeftModel parameter (the untrained original of a
    `modules_to_save` module); None for adapters and trained copies."""
    if _LORA.match(name) or ".modules_to_save." in name:
        return None
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def merged_tensors(step_dir: Path, recipe: Any, *, merged: bool, fan_in_fan_out: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(plain name, full fp32 tensor) of the merged model (`merged`) or of the base alone, one
    layer's base weight held at a time while its adapters arrive (they follow it in model order)."""
    pending: dict[str, dict[str, Any]] = {}
    rename = hf_name if merged else base_name
    scaling = recipe.lora.alpha / recipe.lora.rank
    for name, t in iter_full_params(step_dir):
        m = _LORA.match(name)
        if m and not merged:
            continue
        if m:
            key = m["module"] + ".base_layer.weight"
            pending.setdefault(key, {})[m["ab"]] = t
            pending[key]["embedding"] = ".lora_embedding_" in name
        elif merged and name.endswith(".base_layer.weight"):
            key = name
            pending.setdefault(key, {})["W"] = t
        else:
            out = rename(name)
            if out is not None:
                yield out, t
            continue
        got = pending[key]
        if all(k in got for k in ("W", "A", "B")):
            del pending[key]
            # PEFT's get_delta_weight: B @ A, transposed for embeddings and Conv1D (fan_in_fan_out)
            delta = got["B"] @ got["A"]
            if got.get("embedding") or fan_in_fan_out:
                delta = delta.T
            yield hf_name(key), got["W"] + scaling * delta
    if pending:
        raise UserError(f"{step_dir}: adapters without their base weight: {sorted(pending)[:3]}")


def export_lora(step_dir: Path, out: Path, *, recipe: Any, dtype: str, merge: bool, max_shard_size: str | int = "5GB",
                trust_remote_code: bool = False) -> dict[str, Any]:
    """The adapter (or with `merge` the merged model) of the LoRA checkpoint at `step_dir` into
    `out` (new or empty). Returns a summary like `export_checkpoint`'s."""
    from launcher.checkpoint.export import EXPORT_DTYPES, _recipe_config, _remove

    start = time.perf_counter()
    recipe, config, tokenizer = _recipe_config(recipe, trust_remote_code)
    if getattr(recipe.train, "method", "full") == "qlora" and merge:
        raise UserError(
            f"{step_dir}: --merge of a QLoRA run is not supported (its base is stored in 4-bit): export "
            "the adapter and merge it into the full-precision base with peft's merge_and_unload"
        )
    created = not out.exists()
    try:
        if merge:
            summary = _write_model(step_dir, out, recipe, config, tokenizer, EXPORT_DTYPES[dtype], merged=True,
                                   max_shard_size=max_shard_size)
        else:
            summary = _write_adapter(step_dir, out, recipe, config, tokenizer, EXPORT_DTYPES[dtype],
                                     max_shard_size=max_shard_size)
    except BaseException:
        _remove(out, created, [])
        raise
    return {"step_dir": str(step_dir), "out": str(out), "dtype": dtype, "lora": True, "merged": merge, **summary,
            "seconds": round(time.perf_counter() - start, 3)}


def _peft_meta(recipe: Any, config: Any) -> Any:
    """The run's PeftModel on the meta device: PEFT's own naming and config for the export."""
    from peft import get_peft_model

    from launcher.runtime.lora import meta_model, peft_config

    base = meta_model(recipe, config)
    return get_peft_model(base, peft_config(recipe, base))


def _write_adapter(step_dir: Path, out: Path, recipe: Any, config: Any, tokenizer: Any, target: torch.dtype,
                   *, max_shard_size: str | int) -> dict[str, Any]:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    meta = read_meta(step_dir)
    trainable = [n for n in meta.param_shapes if n in meta.param_groups]
    model = _peft_meta(recipe, config)
    have = dict(model.named_parameters())
    unknown = [n for n in trainable if n not in have]
    if unknown:
        raise UserError(f"{step_dir}: the checkpoint has {unknown[0]}, which the recipe's LoRA model does not: "
                        "export with the recipe the checkpoint was trained with")
    values = {n: t.to(target) for n, t in iter_full_params(step_dir, trainable)}
    model.load_state_dict(values, strict=False, assign=True)
    state = get_peft_model_state_dict(model)
    missing = [k for k, v in state.items() if v.is_meta]
    if missing:
        raise UserError(f"{step_dir}: the checkpoint has no value for the adapter's {missing[0]}")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    cfg = model.peft_config["default"]
    summary: dict[str, Any] = {"files": [ADAPTER_FILE, "adapter_config.json"], "tensors": len(state),
                               "params": sum(v.numel() for v in state.values()),
                               "total_bytes": sum(v.numel() * v.element_size() for v in state.values())}
    if not recipe.model.name_or_path:
        # a random-init base exists only in this checkpoint: write it beside the adapter
        summary["base"] = str(out / "base")
        _write_model(step_dir, out / "base", recipe, config, tokenizer, target, merged=False,
                     max_shard_size=max_shard_size)
        cfg.base_model_name_or_path = str((out / "base").resolve())
    cfg.inference_mode = True  # as PeftModel.save_pretrained writes it
    cfg.save_pretrained(str(out))
    tokenizer.save_pretrained(out)
    return summary


def _write_model(step_dir: Path, out: Path, recipe: Any, config: Any, tokenizer: Any, target: torch.dtype, *,
                 merged: bool, max_shard_size: str | int) -> dict[str, Any]:
    """The merged model (or the base alone) as Hugging Face shards, index, config and tokenizer."""
    from launcher.checkpoint.export import _check_matches, _write_config
    from launcher.runtime.lora import FAN_IN_FAN_OUT

    meta = read_meta(step_dir)
    rename = hf_name if merged else base_name
    shapes = {}
    for n, shape in meta.param_shapes.items():
        plain = rename(n)
        if plain is not None:
            shapes[plain] = tuple(shape)
    buffers = {rename(n) or n: b for n, b in read_buffers(step_dir).items()}
    shapes.update({n: tuple(b.shape) for n, b in buffers.items()})
    shared = {rename(a): rename(s) for a, s in meta.shared_params.items() if rename(a) and rename(s)}
    _check_matches(SimpleNamespace(shared_params=shared, param_shapes=shapes), config, shapes, step_dir)
    specs = [TensorSpec(n, s, target if n not in buffers or buffers[n].is_floating_point() else buffers[n].dtype)
             for n, s in shapes.items()]
    plan = plan_shards(specs, max_shard_size)
    files = shard_names(len(plan))
    out.mkdir(parents=True, exist_ok=True)
    writers = {s.name: w for w, shard in ((ShardWriter(out / f, shard), shard) for f, shard in zip(files, plan))
               for s in shard}
    fan = getattr(config, "model_type", "") in FAN_IN_FAN_OUT
    try:
        tensors = merged_tensors(step_dir, recipe, merged=merged, fan_in_fan_out=fan)
        for name, t in [*tensors, *buffers.items()]:
            writers[name].write_at(name, t.to(target) if t.is_floating_point() else t)
        for w in {id(w): w for w in writers.values()}.values():
            w.close()
    except BaseException:
        for w in {id(w): w for w in writers.values()}.values():
            w.abort()
        raise
    n_params = sum(torch.Size(s).numel() for n, s in shapes.items() if n not in buffers)
    _write_config(out, files, plan, n_params, config, target, tokenizer)
    return {"files": files + ["model.safetensors.index.json"], "tensors": len(specs), "params": n_params,
            "total_bytes": sum(s.nbytes for s in specs)}

