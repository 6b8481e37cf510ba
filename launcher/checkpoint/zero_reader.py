"""Read one DeepSpeed checkpoint step directory (ZeRO stage 0-3, DeepSpeed 0.19.x) without
unpickling code and without holding the whole checkpoint in memory.

Layouts (what `engine.save_checkpoint` writes, see deepspeed/utils/zero_to_fp32.py and
deepspeed/checkpoint/ds_to_universal.py):

- stage 0: `mp_rank_00_model_states.pt` holds the full `module` state dict and the plain torch
  optimizer state (`optimizer`: `state` keyed by parameter index in optimizer order).
- stage 1/2 (and bf16 + stage 1, whose files are named `bf16_zero_pp_rank_*`): one
  `mp_rank_00_model_states.pt` (full bit16 `module`, `param_shapes` per optimizer group,
  `shared_params`, `buffer_names`, frozen params) and, per data-parallel rank r,
  `zero_pp_rank_{r}_mp_rank_00_optim_states.pt` with this rank's slice of each flat fp32 group
  (`single_partition_of_fp32_groups[g]`), the matching `exp_avg`/`exp_avg_sq` in
  `base_optimizer_state.state[g]`, and `param_slice_mappings[g][name] = (numel, start)`: which
  part of which parameter lies where in the rank's slice (alignment padding included).
- stage 3: per rank a `zero_pp_rank_{r}_mp_rank_00_model_states.pt` (placeholders in `module`,
  `param_shapes` per optimizer sub-group) and an optim file with `fp32_flat_groups[s]` and
  `optimizer_state_dict.state[s]`; every parameter of sub-group s is cut into
  ceil(numel / world) elements per rank, the last rank's part zero-padded.

Every `.pt` file is opened with `safe_load`: `torch.load(weights_only=True, mmap=True)` with an
allowlist of exactly the DeepSpeed classes these files contain. Tensors are memory-mapped; the
readers copy what they need and drop (unmap) the files every `remap_bytes` bytes read, so the
resident set stays near one tensor plus that budget instead of growing to the checkpoint size.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from launcher.errors import UserError

REMAP_BYTES = 256 * 1024**2
"""Default bytes read from memory-mapped files before they are unmapped and opened again."""

_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_Z3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_PIPE_LAYER_RE = re.compile(r"^layer_(\d+)-model_states\.pt$")
STATE_KEYS = ("exp_avg", "exp_avg_sq")


# --------------------------------------------------------------------------------------------
# safe loading


def allowed_globals() -> list[Any]:
    """The classes a DeepSpeed 0.19 checkpoint pickles besides tensors and containers.

    Found by `torch.serialization.get_unsafe_globals_in_checkpoint` on checkpoints of every ZeRO
    stage: the stage enum, the (static or dynamic, for fp16) loss scaler, and the fragment
    addresses of ZeRO-1/2's `param_slice_mappings`. All are plain data; none runs code when built.
    """
    # DeepSpeed's logger writes to the stdout of its first import: keep it off `--json` output
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path: str | Path, *, mmap: bool = True) -> Any:
    """`torch.load` that never unpickles code: weights_only with the DeepSpeed allowlist.

    A file that names anything else (say `os.system` through `__reduce__`) raises `UserError`
    naming the file and the offending global; nothing in it is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    if mmap and not zipfile.is_zipfile(path):
        mmap = False  # the legacy (non-zip) format cannot be mapped; still weights_only
    try:
        with torch.serialization.safe_globals(allowed_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4"
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        if found:
            what = f"it references {found.group(1)}, which is not one of the DeepSpeed checkpoint types allowed"
        else:
            reason = detail.group(1).strip() if detail else text.strip().splitlines()[0]
            what = f"the weights-only unpickler rejects it ({reason}): it is not plain tensor data"
        raise UserError(
            f"{path}: refused to load: {what}; the file may be crafted to run code when unpickled. "
            "Only use checkpoints you trust."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: not a readable torch checkpoint ({first}); the file may be truncated or "
            "not written by torch.save"
        ) from None


# --------------------------------------------------------------------------------------------
# metadata


@dataclass
class ZeroMeta:
    """What a checkpoint step holds, read from its small metadata only."""

    zero_stage: int
    dp_world_size: int
    param_shapes: dict[str, tuple[int, ...]]
    """Every parameter that owns its data (trainable and frozen), in the model's order; tied
    aliases are in `shared_params` instead."""
    param_groups: dict[str, int]
    """Optimizer param-group index of each trainable parameter (frozen ones are absent)."""
    shared_params: dict[str, str]
    """Tied weights: alias name -> the name whose data it shares (e.g. lm_head -> embed_tokens)."""
    buffer_names: list[str]
    frozen_params: list[str]
    optimizer_step: int | None
    """The optimizer's own step count (Adam's bias correction), from the saved optimizer state."""
    global_steps: int | None
    """The engine's step counter (`global_steps` in the model states)."""
    ds_version: str | None
    model_dtype: torch.dtype
    """dtype of the saved `module` weights (the training dtype: bf16, fp16 or fp32)."""
    state_keys: tuple[str, ...] = STATE_KEYS
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Frag:
    rank: int
    group: int  # index of the flat tensor in the rank's file
    start: int  # offset in that flat tensor
    numel: int
    dest: int  # offset in the full parameter


@dataclass
class _Layout:
    meta: ZeroMeta
    step_dir: Path
    model_file: Path  # rank 0's model states (stage 0-2: the only one)
    optim_files: list[Path]  # by rank; empty for stage 0
    frags: dict[str, list[_Frag]]  # trainable parameters
    stage0_index: dict[str, int]  # stage 0: parameter -> index in the torch optimizer state


def _model_files(step_dir: Path) -> tuple[list[Path], bool]:
    z3 = sorted(
        (p for p in step_dir.iterdir() if _Z3_MODEL_RE.match(p.name)),
        key=lambda p: int(_Z3_MODEL_RE.match(p.name).group(1)),
    )
    if z3:
        return z3, True
    single = step_dir / "mp_rank_00_model_states.pt"
    if single.is_file():
        return [single], False
    raise UserError(
        f"{step_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt or "
        "zero_pp_rank_*_mp_rank_00_model_states.pt): not a DeepSpeed checkpoint directory"
    )


def _optim_files(step_dir: Path) -> list[Path]:
    found: dict[int, Path] = {}
    for p in step_dir.iterdir():
        m = _OPTIM_RE.match(p.name)
        if not m:
            continue
        if int(m.group(2)) != 0:
            raise UserError(f"{p}: tensor-parallel checkpoints (mp_rank > 0) are not supported")
        found[int(m.group(1))] = p
    if found and sorted(found) != list(range(len(found))):
        raise UserError(f"{step_dir}: optimizer files for ranks {sorted(found)}: some ranks are missing")
    return [found[r] for r in range(len(found))]


def _stage_of(model_sd: dict, optim_sd: dict | None) -> int:
    if optim_sd is not None and "zero_stage" in optim_sd:
        return int(optim_sd["zero_stage"])
    cfg = model_sd.get("ds_config") or {}
    return int((cfg.get("zero_optimization") or {}).get("stage", 0))


def _numel(shape: Iterable[int]) -> int:
    return math.prod(int(s) for s in shape)


def _layout(step_dir: str | Path) -> _Layout:
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise UserError(f"{step_dir}: checkpoint directory does not exist")
    files = tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in step_dir.iterdir()
                         if p.suffix == ".pt" and (st := p.stat())))
    return _cached_layout(step_dir.resolve(), files)


@functools.lru_cache(maxsize=4)
def _cached_layout(step_dir: Path, files: tuple) -> _Layout:
    """Metadata of a step directory; cached while its .pt files are unchanged."""
    model_files, is_z3 = _model_files(step_dir)
    optim_files = _optim_files(step_dir)
    model_sd = safe_load(model_files[0])
    module = model_sd.get("module")
    if not isinstance(module, dict):
        raise UserError(f"{model_files[0]}: no 'module' state dict: not a DeepSpeed model states file")
    first_optim = safe_load(optim_files[0])["optimizer_state_dict"] if optim_files else None
    stage = _stage_of(model_sd, first_optim)
    if is_z3:
        stage = 3
    buffer_names = list(model_sd.get("buffer_names") or [])
    shared = dict(model_sd.get("shared_params") or {})
    frozen_shapes = dict(model_sd.get("frozen_param_shapes") or {})
    floating = [v for v in module.values() if torch.is_tensor(v) and v.is_floating_point()]
    model_dtype = floating[0].dtype if floating else torch.float32
    frags: dict[str, list[_Frag]] = {}
    groups: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    stage0_index: dict[str, int] = {}
    optimizer_step = None

    if stage == 0 or not optim_files:
        stage = 0
        opt = model_sd.get("optimizer")
        shared = shared or _aliases_by_storage(module)
        for name, t in module.items():
            if name in buffer_names or name in shared:
                continue
            shapes[name] = tuple(t.shape)
        if isinstance(opt, dict) and "param_groups" in opt:
            trainable = [n for n in shapes if n not in frozen_shapes]
            order = _stage0_optimizer_order(trainable, shapes, opt)
            for gi, g in enumerate(opt["param_groups"]):
                for idx in g["params"]:
                    stage0_index[order[idx]] = idx
                    groups[order[idx]] = gi
            optimizer_step = _step_of(opt.get("state", {}))
        world = int(model_sd.get("dp_world_size") or 1)
    else:
        world = len(optim_files)
        if is_z3 and len(model_files) != world:
            raise UserError(
                f"{step_dir}: {len(model_files)} model states files but {world} optimizer files: "
                "the checkpoint is incomplete"
            )
        param_shapes = model_sd.get("param_shapes") or []
        osd = first_optim
        if stage == 3:
            # sub-group s belongs to the optimizer group whose 'params' lists s
            sub_to_group = {}
            for gi, g in enumerate(osd["optimizer_state_dict"]["param_groups"]):
                for s in g["params"]:
                    sub_to_group[s] = gi
            flat_sizes = [t.numel() for t in osd["fp32_flat_groups"]]
            for s, sub in enumerate(param_shapes):
                offset = 0
                for name, shape in sub.items():
                    n = _numel(shape)
                    part = -(-n // world)
                    frags[name] = [
                        _Frag(r, s, offset, max(0, min(part, n - r * part)), r * part)
                        for r in range(world)
                        if n - r * part > 0
                    ]
                    offset += part
                    groups[name] = sub_to_group.get(s, s)
                    shapes[name] = tuple(int(x) for x in shape)
                if offset > flat_sizes[s]:
                    raise UserError(
                        f"{optim_files[0]}: sub-group {s} holds {flat_sizes[s]} elements but its "
                        f"parameters need {offset}: the checkpoint does not match its metadata"
                    )
            optimizer_step = _step_of(osd["optimizer_state_dict"].get("state", {}))
        else:
            for gi, sub in enumerate(param_shapes):
                for name, shape in sub.items():
                    groups[name] = gi
                    shapes[name] = tuple(int(x) for x in shape)
                    frags[name] = []
            for r, f in enumerate(optim_files):
                rank_osd = osd if r == 0 else safe_load(f)["optimizer_state_dict"]
                mappings = rank_osd.get("param_slice_mappings")
                if mappings is None:
                    raise UserError(f"{f}: no param_slice_mappings (written by DeepSpeed < 0.10?): not supported")
                for gi, mapping in enumerate(mappings):
                    for name, addr in mapping.items():
                        got = frags.setdefault(name, [])
                        dest = sum(x.numel for x in got)
                        got.append(_Frag(r, gi, int(addr.start), int(addr.numel), dest))
                del rank_osd
            optimizer_step = _step_of(osd["base_optimizer_state"].get("state", {}))
        for name in frozen_shapes:
            shapes[name] = tuple(int(x) for x in frozen_shapes[name])
        for name, parts in frags.items():
            if sum(p.numel for p in parts) != _numel(shapes[name]):
                raise UserError(f"{step_dir}: the shards do not cover parameter {name}: checkpoint incomplete")
        # model order: the module state dict's key order
        order = [k for k in module if k in shapes]
        shapes = {k: shapes[k] for k in order + [k for k in shapes if k not in module]}

    steps = model_sd.get("global_steps")
    meta = ZeroMeta(
        zero_stage=stage,
        dp_world_size=world,
        param_shapes=shapes,
        param_groups=groups,
        shared_params=shared,
        buffer_names=buffer_names,
        frozen_params=list(frozen_shapes),
        optimizer_step=optimizer_step,
        global_steps=int(steps) if steps is not None else None,
        ds_version=str(model_sd.get("ds_version")) if model_sd.get("ds_version") else None,
        model_dtype=model_dtype,
        files=[p.name for p in model_files + optim_files],
    )
    del model_sd, module, first_optim
    return _Layout(meta, step_dir, model_files[0], optim_files, frags, stage0_index)


def _aliases_by_storage(module: dict) -> dict[str, str]:
    """Stage 0 records no `shared_params`; tied tensors share one storage in the saved file."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for name, t in module.items():
        if not torch.is_tensor(t) or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            out[name] = seen[key]
        else:
            seen[key] = name
    return out


def _stage0_optimizer_order(trainable: list[str], shapes: dict, opt: dict) -> list[str]:
    """Names in the torch optimizer's parameter order for a stage-0 checkpoint.

    Stage 0 stores no names: the order is that of the param groups the engine was given. With
    `launcher.runtime.model.param_groups` (decay first, then no-decay) it is recovered by the
    same rule; with one group it is the module order.
    """
    sizes = [len(g["params"]) for g in opt["param_groups"]]
    if len(sizes) == 1:
        ordered = trainable
    else:
        def no_decay(n: str) -> bool:
            return len(shapes[n]) < 2 or "norm" in n.lower() or n.endswith(".bias")

        ordered = [n for n in trainable if not no_decay(n)] + [n for n in trainable if no_decay(n)]
    if sum(sizes) != len(ordered):
        raise UserError(
            f"stage-0 checkpoint: the optimizer has {sum(sizes)} parameters but the model "
            f"{len(ordered)}: cannot match optimizer state to names"
        )
    return ordered


def _step_of(state: dict) -> int | None:
    for s in state.values():
        if isinstance(s, dict) and "step" in s:
            v = s["step"]
            return int(v.item() if torch.is_tensor(v) else v)
    return None


def read_meta(step_dir: str | Path) -> ZeroMeta:
    """Stage, world size, parameter names/shapes/groups, ties, buffers and step of a checkpoint."""
    return _layout(step_dir).meta


# --------------------------------------------------------------------------------------------
# bounded-memory readers


class _Files:
    """The ranks' optimizer files, read tensor slice by tensor slice.

    Each file is opened with `safe_load(mmap=True)` for its structure only; the bytes of a slice
    are then read with `pread` straight into the output tensor, at the file offset of the slice's
    storage (found from the mapping, checked against the zip directory). Nothing is read through
    the mapping, so the resident set does not grow with the checkpoint. If an offset cannot be
    established, slices are copied through the mapping instead, and the files are unmapped and
    reopened every `budget` bytes (pages read through a mapping stay resident while it lives).
    """

    def __init__(self, layout: _Layout, budget: int) -> None:
        self.layout = layout
        self.budget = budget
        self.read = 0
        self._open: dict[int, dict] = {}
        self._fds: dict[int, int] = {}
        self._base: dict[int, int | None] = {}

    def flat(self, rank: int, key: str, group: int) -> torch.Tensor:
        """Rank `rank`'s flat tensor `group` of `key` ('fp32' or an optimizer state key)."""
        osd = self._open.get(rank)
        if osd is None:
            osd = self._open[rank] = safe_load(self.layout.optim_files[rank])["optimizer_state_dict"]
        if self.layout.meta.zero_stage == 3:
            if key == "fp32":
                return osd["fp32_flat_groups"][group]
            return osd["optimizer_state_dict"]["state"][group][key]
        if key == "fp32":
            return osd["single_partition_of_fp32_groups"][group]
        return osd["base_optimizer_state"]["state"][group][key]

    def _file_base(self, rank: int) -> int | None:
        """Address of byte 0 of rank `rank`'s file in its mapping, or None if unknown."""
        if rank in self._base:
            return self._base[rank]
        base = None
        try:
            path = self.layout.optim_files[rank]
            self.flat(rank, "fp32", 0)
            ptrs = [t.untyped_storage().data_ptr() for t in _tensors(self._open[rank]) if t.untyped_storage().nbytes()]
            with zipfile.ZipFile(path) as z, open(path, "rb") as f:
                offsets = []
                for zi in z.infolist():
                    if "/data/" in zi.filename and zi.compress_type == zipfile.ZIP_STORED and zi.file_size:
                        f.seek(zi.header_offset)
                        head = f.read(30)
                        offsets.append(zi.header_offset + 30 + int.from_bytes(head[26:28], "little")
                                       + int.from_bytes(head[28:30], "little"))
            if ptrs and offsets and len(set(ptrs)) == len(offsets):
                base = min(ptrs) - min(offsets)
                if {p - base for p in ptrs} != set(offsets):
                    base = None
        except (OSError, zipfile.BadZipFile, KeyError, IndexError):
            base = None
        self._base[rank] = base
        if base is not None:
            self._fds[rank] = os.open(self.layout.optim_files[rank], os.O_RDONLY)
        return base

    def count(self, nbytes: int) -> None:
        self.read += nbytes
        if self.read >= self.budget:
            self.reset(keep_fds=True)

    def reset(self, keep_fds: bool = False) -> None:
        self._open.clear()
        self.read = 0
        if not keep_fds:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._base.clear()

    def gather(self, name: str, key: str) -> torch.Tensor:
        parts = self.layout.frags[name]
        shape = self.layout.meta.param_shapes[name]
        out = torch.empty(_numel(shape), dtype=torch.float32)
        for p in parts:
            src = self.flat(p.rank, key, p.group)
            base = self._file_base(p.rank)
            dst = out.narrow(0, p.dest, p.numel)
            if base is not None and src.dtype == torch.float32 and src.is_contiguous():
                offset = src.untyped_storage().data_ptr() + (src.storage_offset() + p.start) * 4 - base
                _pread_into(self._fds[p.rank], dst, offset)
            else:
                dst.copy_(src.narrow(0, p.start, p.numel))
                self.count(p.numel * src.element_size())
        return out.view(shape)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _pread_into(fd: int, dst: torch.Tensor, offset: int) -> None:
    view = memoryview(dst.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise UserError(f"checkpoint file ended early at byte {offset + done}: the file is truncated")
        done += n


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
    files = _Files(layout, remap_bytes)
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


def _module_tensors(layout: _Layout, names: list[str], remap_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors of `names` (in that order) from the module weights / frozen fragments."""
    meta = layout.meta
    read = 0
    sds: list[dict] | None = None
    for name in names:
        if sds is None:
            if meta.zero_stage == 3 and name in meta.frozen_params:
                sds = [safe_load(layout.step_dir / f) for f in meta.files if _Z3_MODEL_RE.match(f)]
            else:
                sds = [safe_load(layout.model_file)]
        shape = meta.param_shapes[name]
        if name in meta.frozen_params and meta.zero_stage == 3:
            frs = [sd["frozen_param_fragments"][name].reshape(-1) for sd in sds]
            t = torch.cat(frs).narrow(0, 0, _numel(shape)).view(shape)
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
    files = _Files(layout, remap_bytes)
    for name in wanted:
        yield name, {key: files.gather(name, key) for key in ("fp32", *STATE_KEYS)}
    files.reset()


def _stage0_states(layout: _Layout, names: list[str], remap_bytes: int) -> Iterator[tuple[str, dict]]:
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
        read += 3 * _numel(shape) * 4
        yield name, out
        if read >= remap_bytes:
            sd, read = None, 0


# --------------------------------------------------------------------------------------------
# pipeline checkpoints


def pipeline_layer_files(step_dir: str | Path) -> dict[int, Path]:
    """A pipeline checkpoint's `layer_XX-model_states.pt` files by layer index (empty: not a
    pipeline checkpoint). Each holds one pipe layer's full state dict (bit16 or fp32 weights, as
    the model trains); the optimizer's fp32 copies are in the per-stage optimizer files."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise UserError(f"{step_dir}: checkpoint directory does not exist")
    found = {}
    for p in step_dir.iterdir():
        m = _PIPE_LAYER_RE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def read_pipeline_layer(path: str | Path) -> dict[str, torch.Tensor]:
    """One pipe layer's state dict, through `safe_load` (memory-mapped)."""
    sd = safe_load(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a pipeline layer state dict (expected names -> tensors)")
    return sd
