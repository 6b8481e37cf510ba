"""Loading `.pt` files without unpickling code: `torch.load(weights_only=True)` with an allowlist
of exactly the DeepSpeed classes its checkpoints hold.

Every reader of checkpoint files goes through `safe_load`: the export, the reshard, and the
same-layout resume (DeepSpeed's own loader, given `launcher.checkpoint.ds_engine`'s checkpoint
engine, whose `load` is this function).
"""

from __future__ import annotations

import contextlib
import enum
import pickle
import re
import sys
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from launcher.errors import UserError

_LOCK = threading.RLock()

_DS_NAMES = {
    "ZeroStageEnum": "deepspeed.runtime.zero.config.ZeroStageEnum",
    "LossScaler": "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "DynamicLossScaler": "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "fragment_address": "deepspeed.utils.tensor_fragment.fragment_address",
}


class ZeroStageEnum(int, enum.Enum):
    """Stand-in for DeepSpeed's enum of the same name (same values): a reader that only needs the
    data does not import DeepSpeed (about 2 s)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class _Plain:
    """Stand-in for a DeepSpeed data class: its pickled attributes, nothing else."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class LossScaler(_Plain):
    pass


class DynamicLossScaler(_Plain):
    pass


class fragment_address(_Plain):  # noqa: N801  (DeepSpeed's name)
    numel: int
    start: int


def allowed_globals() -> list[Any]:
    """The classes a DeepSpeed 0.19 checkpoint pickles besides tensors and containers.

    Found by `torch.serialization.get_unsafe_globals_in_checkpoint` on checkpoints of every ZeRO
    stage: the stage enum, the (static or dynamic, for fp16) loss scaler, and the fragment
    addresses of ZeRO-1/2's `param_slice_mappings`. All are plain data; none runs code when built.
    Where DeepSpeed is loaded (a resume hands the objects to it) they are its own classes; else
    stand-ins registered under DeepSpeed's names.
    """
    if "deepspeed" not in sys.modules:
        return [(ZeroStageEnum, _DS_NAMES["ZeroStageEnum"]), (LossScaler, _DS_NAMES["LossScaler"]),
                (DynamicLossScaler, _DS_NAMES["DynamicLossScaler"]),
                (fragment_address, _DS_NAMES["fragment_address"])]
    # DeepSpeed's logger writes to the stdout of its first import: keep it off `--json` output
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler as DSDynamic
        from deepspeed.runtime.fp16.loss_scaler import LossScaler as DSLossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum as DSZeroStage
        from deepspeed.utils.tensor_fragment import fragment_address as DSFragment

    return [DSZeroStage, DSLossScaler, DSDynamic, DSFragment]


def safe_load(path: str | Path, *, mmap: bool = True, map_location: Any = "cpu") -> Any:
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
        # torch's allowlist context is process-wide, not per thread: one load at a time enters it
        # (with mmap=True a load reads only the pickle; the tensor data is read later)
        with _LOCK, torch.serialization.safe_globals(allowed_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4"
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UserError(_refusal(path, str(e))) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: not a readable torch checkpoint ({first}); the file may be truncated or "
            "not written by torch.save"
        ) from None


def _refusal(path: Path, text: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", text)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found:
        what = f"it references {found.group(1)}, which is not one of the DeepSpeed checkpoint types allowed"
    else:
        reason = detail.group(1).strip() if detail else text.strip().splitlines()[0]
        what = f"the weights-only unpickler rejects it ({reason}): it is not plain tensor data"
    return (f"{path}: refused to load: {what}; the file may be crafted to run code when unpickled. "
            "Only use checkpoints you trust.")


def unsafe_globals(path: str | Path) -> list[str]:
    """The globals a `.pt` file's pickle names beyond tensors, containers and the DeepSpeed
    allowlist, found by disassembling it (nothing is built; the tensor data is not read)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return [f"{path.name}: not a torch zip checkpoint"]
    try:
        with _LOCK, torch.serialization.safe_globals(allowed_globals()):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, OSError, ValueError, zipfile.BadZipFile) as e:
        return [f"{path.name}: unreadable ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"]


def scan_step(step_dir: str | Path) -> str | None:
    """Why a step directory's `.pt` files must not be loaded (a global outside the allowlist, or
    a file that is not a torch zip checkpoint), or None: one cheap pass by one rank before any
    rank starts loading, so that all ranks refuse together."""
    for path in sorted(Path(step_dir).rglob("*.pt")):
        bad = unsafe_globals(path)
        if bad:
            return _refusal(path, f"GLOBAL {bad[0]}") if ":" not in bad[0] else f"{path.parent}/{bad[0]}"
    return None
