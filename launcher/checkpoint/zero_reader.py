"""Read one DeepSpeed checkpoint step directory (ZeRO stage 0-3, DeepSpeed 0.19.x) without
unpickling code and without holding the whole checkpoint in memory: full fp32 parameters and
Adam states, one parameter at a time.

The pieces: `safe_load` (weights-only loading with the DeepSpeed allowlist), `zero_layout` /
`zero_meta` (what a step holds) with one parser per on-disk format (`zero_stage0`,
`zero_stage12`, `zero_stage3`, `pipeline_files`), and `offset_reads` (slices read with `pread`).
Tensors are memory-mapped; the readers copy what they need and drop (unmap) the files every
`remap_bytes` bytes read, so the resident set stays near one tensor plus that budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from launcher.checkpoint.offset_reads import ShardSlices
from launcher.checkpoint.pipeline_files import pipeline_layer_files, read_pipeline_layer
from launcher.checkpoint.safe_load import allowed_globals, safe_load
from launcher.checkpoint.zero_layout import layout as _layout
from launcher.checkpoint.zero_layout import read_meta
from launcher.checkpoint.zero_meta import STATE_KEYS, Z3_MODEL_RE, Layout, ZeroMeta, numel
from launcher.errors import UserError

__all__ = [
    "REMAP_BYTES", "STATE_KEYS", "ZeroMeta", "allowed_globals", "iter_full_optimizer_states",
    "iter_full_params", "pipeline_layer_files", "read_buffers", "read_meta", "read_pipeline_layer",
    "safe_load",
]

REMAP_BYTES = 256 * 1024**2
"""Default bytes read from memory-mapped files before they are unmapped and opened again."""


def _select(meta: ZeroMeta, names: Iterable[str] | None, pool: Iterable[str]) -> list[str]:
    pool = list(pool)
    if names is None:
        return pool
    names = list(names)
    unknown = [n for n in names if n not in meta.param_shapes and n not in meta.shared_params]
    if unknown:
        raise UserError(f"checkpoint has no parameter {unknown[0]!r}")
    return [meta.shared_params.get(n, n) for n in names]


def iter_full_params(
    step_dir: str | Path, names: Iterable[str] | None = None, *, remap_bytes: int = REMAP_BYTES
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each parameter's full fp32 tensor, one at a time, in model order.

    Trainable parameters come from the fp32 master weights; frozen ones (and all of stage 0)
    from the saved module weights, cast to fp32. Tied aliases are not repeated: see
    `ZeroMeta.shared_params` (asking for an alias by name yields its source under the source's
    name). Buffers: `read_buffers`.
    """
    layout = _layout(step_dir)
    meta = layout.meta
    files = ShardSlices(layout, remap_bytes)
    wanted = _select(meta, names, meta.param_shapes)
    module_names = [n for n in wanted if n not in layout.frags]
    module_values = _module_tensors(layout, module_names, remap_bytes) if module_names else iter(())
    for name in wanted:
        if name in layout.frags:
            yield name, files.gather(name, "fp32")
        else:
            got_name, t = next(module_values)
            assert got_name == name
            yield name, t
    files.reset()


def _module_tensors(layout: Layout, names: list[str], remap_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors of `names` (in that order) from the module weights / frozen fragments."""
    meta = layout.meta
    read = 0
    sds: list[dict] | None = None
    for name in names:
        if sds is None:
            if meta.zero_stage == 3 and name in meta.frozen_params:
                sds = [safe_load(layout.step_dir / f) for f in meta.files if Z3_MODEL_RE.match(f)]
            else:
                sds = [safe_load(layout.model_file)]
        shape = meta.param_shapes[name]
        if name in meta.frozen_params and meta.zero_stage == 3:
            frs = [sd["frozen_param_fragments"][name].reshape(-1) for sd in sds]
            t = torch.cat(frs).narrow(0, 0, numel(shape)).view(shape)
        elif name in meta.frozen_params:
            t = sds[0]["frozen_param_fragments"][name].view(shape)
        else:
            t = sds[0]["module"][name]
        out = t.to(torch.float32) if t.is_floating_point() else t.clone()
        if out.data_ptr() == t.data_ptr():
            out = out.clone()
        read += out.numel() * t.element_size()
        yield name, out
        if read >= remap_bytes:
            sds, read = None, 0


def read_buffers(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """The persistent buffers saved with the model (floating ones in fp32); usually small."""
    layout = _layout(step_dir)
    if not layout.meta.buffer_names:
        return {}
    module = safe_load(layout.model_file)["module"]
    out = {}
    for name in layout.meta.buffer_names:
        t = module[name]
        out[name] = t.to(torch.float32) if t.is_floating_point() else t.clone()
    return out


def iter_full_optimizer_states(
    step_dir: str | Path, names: Iterable[str] | None = None, *, remap_bytes: int = REMAP_BYTES
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Per trainable parameter `{"fp32", "exp_avg", "exp_avg_sq"}` as full, unpartitioned fp32
    tensors in the parameter's shape, one parameter at a time, in model order. The optimizer step
    is `read_meta(step_dir).optimizer_step`; the group of each parameter `meta.param_groups`."""
    layout = _layout(step_dir)
    meta = layout.meta
    trainable = [n for n in meta.param_shapes if n in meta.param_groups]
    wanted = [n for n in _select(meta, names, trainable) if n in meta.param_groups]
    if meta.zero_stage == 0:
        yield from _stage0_states(layout, wanted, remap_bytes)
        return
    files = ShardSlices(layout, remap_bytes)
    for name in wanted:
        yield name, {key: files.gather(name, key) for key in ("fp32", *STATE_KEYS)}
    files.reset()


def _stage0_states(layout: Layout, names: list[str], remap_bytes: int) -> Iterator[tuple[str, dict]]:
    read = 0
    sd = None
    for name in names:
        if sd is None:
            sd = safe_load(layout.model_file)
        shape = layout.meta.param_shapes[name]
        state = sd["optimizer"]["state"].get(layout.stage0_index[name], {})
        out = {"fp32": sd["module"][name].to(torch.float32).clone()}
        for key in STATE_KEYS:
            if key in state:
                out[key] = state[key].to(torch.float32).clone().view(shape)
        read += 3 * numel(shape) * 4
        yield name, out
        if read >= remap_bytes:
            sd, read = None, 0
