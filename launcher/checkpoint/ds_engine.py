"""The checkpoint engine the launcher gives DeepSpeed (`engine.checkpoint_engine`): DeepSpeed
keeps deciding what goes in which file, but

- `save` does not write: it copies the state to host memory (the only part of a save training
  waits for) and queues it; `launcher.checkpoint.checkpointer` writes the queue, hashing every
  byte as it goes out, in a background thread;
- `load` is `safe_load`: DeepSpeed's own loader (same-layout resume, pipeline layers included)
  fills the engine without unpickling anything but tensors, containers and the four DeepSpeed
  data classes of the allowlist. Its `TorchCheckpointEngine.load` calls
  an unrestricted `torch.load`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint.hashing import HashingWriter
from launcher.checkpoint.safe_load import safe_load


def _tensors(obj: Any, seen: set[int]) -> list[torch.Tensor]:
    """Every tensor reachable through containers and plain objects' attributes."""
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = list(vars(obj).values())
    else:
        return []
    out: list[torch.Tensor] = []
    for v in items:
        out += _tensors(v, seen)
    return out


def host_copy(state: Any, *, pin: bool = False) -> Any:
    """A deep copy of `state` whose tensors live in (pinned, with `pin`) host memory.

    Tensors that share a storage share the copy of it, with their offsets and strides, so
    `torch.save` writes the same storages as it would have for the live state (ties detected by
    storage identity survive). Training may change the live tensors the moment this returns.
    """
    storages: dict[tuple[int, str], torch.UntypedStorage] = {}
    memo: dict[int, Any] = {}
    for t in _tensors(state, set()):
        src = t.untyped_storage()
        key = (src.data_ptr(), str(t.device))
        dst = storages.get(key)
        if dst is None:
            buf = torch.empty(src.nbytes(), dtype=torch.uint8, pin_memory=pin and t.is_cuda)
            dst = buf.untyped_storage()
            if src.nbytes():
                dst.copy_(src, non_blocking=pin and t.is_cuda)
            storages[key] = dst
        new = torch.empty(0, dtype=t.dtype).set_(dst, t.storage_offset(), t.size(), t.stride())
        memo[id(t)] = new.requires_grad_(False)
    if pin and torch.cuda.is_available():
        torch.cuda.synchronize()
    return copy.deepcopy(state, memo)


class LauncherCheckpointEngine:
    """Duck-typed like DeepSpeed's `CheckpointEngine` (see the module docstring)."""

    name = "LauncherCheckpointEngine"

    def __init__(self, *, pin: bool = False) -> None:
        self.pin = pin
        self.pending: list[tuple[str, Any]] = []

    # --- what DeepSpeed calls ------------------------------------------------------------
    def create(self, info: Any) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        Path(path).mkdir(parents=True, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        self.pending.append((str(path), host_copy(state_dict, pin=self.pin)))

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, mmap=False, map_location=map_location if map_location is not None else "cpu")

    def commit(self, info: Any) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info: Any) -> None:
        pass

    def get_commit_info(self) -> None:
        return None

    def cleanup(self) -> None:
        pass

    def preserves_storage_sharing(self) -> bool:
        # DeepSpeed then clones the model states before handing them over, as for torch.save
        return True

    # --- what the Checkpointer calls -----------------------------------------------------
    def take(self) -> list[tuple[str, Any]]:
        """The states queued by the last `engine.save_checkpoint`, emptied."""
        out, self.pending = self.pending, []
        return out


def write_state(path: str | Path, state: Any) -> dict[str, Any]:
    """torch.save `state` to `path`, hashed as it is written and fsynced: `{"size", HASH}`."""
    w = HashingWriter(path)
    try:
        torch.save(state, w)
        return w.close()
    except BaseException:
        w.abort()
        raise


def install(engine: Any, *, pin: bool = False) -> LauncherCheckpointEngine:
    """Give `engine` (a DeepSpeed engine) the launcher's checkpoint engine, once."""
    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, LauncherCheckpointEngine):
        return current
    ours = LauncherCheckpointEngine(pin=pin)
    engine.checkpoint_engine = ours
    return ours
