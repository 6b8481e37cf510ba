"""The collective save (with its commit protocol) and load, called by every rank of the loop."""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from launcher.checkpoint.layout import (
    LATEST,
    TMP_SUFFIX,
    StepDir,
    atomic_write_text,
    checkpoints_dir,
    fsync_dir,
    list_step_dirs,
    latest_committed,
    step_tag,
)
from launcher.checkpoint.manifest import FORMAT_VERSION, checkpoint_files, file_digest, write_manifest
from launcher.checkpoint.state import read_rank_state, write_rank_state

DELETING_SUFFIX = ".deleting"


def broadcast(obj: Any) -> Any:
    """Rank 0's value on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def clean_uncommitted(run_dir: Path) -> list[Path]:
    """Remove `.tmp` directories and half-deleted ones (rank 0, before anyone writes)."""
    removed = []
    root = checkpoints_dir(run_dir)
    for s in list_step_dirs(run_dir):
        if not s.committed:
            shutil.rmtree(s.path, ignore_errors=True)
            removed.append(s.path)
    if root.is_dir():
        for p in root.glob(f"*{DELETING_SUFFIX}"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` committed checkpoints. A directory is renamed out
    of the `step-N` namespace first, so a crash mid-delete never leaves a broken "committed" one."""
    committed = [s for s in list_step_dirs(run_dir) if s.committed]
    for s in committed[:-keep_last]:
        doomed = s.path.with_name(s.path.name + DELETING_SUFFIX)
        os.replace(s.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def share_files(step_dir: Path, rank: int, world_size: int) -> list[str]:
    """This rank's files to hash: largest first to the least-loaded rank, the same on every rank."""
    files = sorted(((step_dir / rel).stat().st_size, rel) for rel in checkpoint_files(step_dir))
    load = [0] * world_size
    out: list[list[str]] = [[] for _ in range(world_size)]
    for size, rel in sorted(files, key=lambda x: (-x[0], x[1])):
        r = min(range(world_size), key=lambda i: (load[i], i))
        load[r] += size
        out[r].append(rel)
    return out[rank]


class Checkpointer:
    def __init__(self, run_dir: Path, *, rank: int, world_size: int, meta: dict[str, Any], keep_last: int):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.meta = meta  # layout and recipe fingerprint, recorded in every manifest
        self.keep_last = keep_last
        self.last_save_s: float | None = None

    # --- save ----------------------------------------------------------------------------
    def save(self, engine: Any, step: int, rank_state: dict[str, Any], *, before_commit: Callable[[], None] | None = None) -> Path | None:
        """Write, agree, commit. Returns the committed directory (None if it existed already).

        `before_commit` runs on every rank after all files are durable and may raise (a second
        signal) to abandon the save: nothing is committed and the `.tmp` is cleaned next time."""
        t0 = time.time()
        root = checkpoints_dir(self.run_dir)
        tag = step_tag(step)
        final, tmp = root / tag, root / (tag + TMP_SUFFIX)
        skip = False
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            skip = any(s.committed and s.step == step for s in list_step_dirs(self.run_dir))
            if not skip:
                shutil.rmtree(tmp, ignore_errors=True)  # a crashed save of this same step
        # One decision for all ranks: no rank may go on to write while another has given up.
        if broadcast(skip):
            return None
        engine.save_checkpoint(str(root), tag=tag + TMP_SUFFIX, save_latest=False)
        write_rank_state(tmp, self.rank, rank_state)
        dist.barrier()
        # Hash and fsync the files in parallel: each rank a share of equal bytes, and on each
        # rank the fsyncs (disk-bound) run in threads while the hashing (CPU-bound) goes on.
        mine = {}
        share = share_files(tmp, self.rank, self.world_size)
        with ThreadPoolExecutor(2) as pool:
            synced = [pool.submit(_fsync, tmp / rel) for rel in share]
            for rel in share:
                mine[rel] = file_digest(tmp / rel)
            for f in synced:
                f.result()
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        if before_commit:
            before_commit()
        committed = None
        if self.rank == 0:
            digests = {k: v for part in gathered for k, v in part.items()}
            write_manifest(tmp, digests, {"step": step, "time": time.time(), **self.meta})
            fsync_dir(tmp)
            os.replace(tmp, final)
            fsync_dir(root)
            atomic_write_text(root / LATEST, tag + "\n")
            prune(self.run_dir, self.keep_last)
            committed = final
        dist.barrier()
        self.last_save_s = time.time() - t0
        return committed or final

    # --- load ----------------------------------------------------------------------------
    def find_resume(self) -> StepDir | None:
        """Rank 0 picks the newest committed checkpoint and removes leftovers; all ranks agree."""
        choice = None
        if self.rank == 0:
            clean_uncommitted(self.run_dir)
            choice = latest_committed(self.run_dir)
        return broadcast(choice)

    def load_same_layout(self, engine: Any, step_dir: StepDir) -> dict[str, Any]:
        """DeepSpeed's own loader for an unchanged layout (it unpickles: verified files only)."""
        path, _ = engine.load_checkpoint(
            str(step_dir.path.parent),
            tag=step_dir.path.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            from launcher.errors import UserError

            raise UserError(f"{step_dir.path}: DeepSpeed could not load this checkpoint")
        return read_rank_state(step_dir.path, self.rank)

    def manifest_meta(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, **self.meta}
