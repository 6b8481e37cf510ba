"""The collective save (with its commit protocol) and load, called by every rank of the loop.

A save has two parts. The first, which training waits for, asks DeepSpeed for its state
(`engine.save_checkpoint` with the launcher's checkpoint engine, `ds_engine`), which copies it to
host memory. The second writes those copies (each file hashed as it is written, then fsynced),
gathers the checksums over a process group of its own, and commits: on a background thread
(`background=True`), at most one save in flight, or before `save` returns.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from launcher.checkpoint.commit_mode import commit_mode
from launcher.checkpoint.hashing import write_hashed
from launcher.checkpoint.layout import (
    LATEST,
    MANIFEST,
    TMP_SUFFIX,
    StepDir,
    atomic_write_text,
    checkpoints_dir,
    fsync_dir,
    latest_committed,
    list_step_dirs,
    step_tag,
)
from launcher.checkpoint.manifest import FORMAT_VERSION, checkpoint_files, file_digest, write_manifest
from launcher.checkpoint.state import rank_file, read_rank_state

DELETING_SUFFIX = ".deleting"
WRITE_DELAY_ENV = "LAUNCHER_CKPT_TEST_WRITE_DELAY_S"
"""Seconds a background save waits after writing its files (tests only: lets the kill test land
kills while a save of a tiny model is still in flight)."""


def broadcast(obj: Any, group: Any = None) -> Any:
    """Rank 0's value on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def clean_uncommitted(run_dir: Path) -> list[Path]:
    """Remove `.tmp` directories, step directories without a (complete) manifest and half-deleted
    ones (rank 0, before anyone writes)."""
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


def prune(run_dir: Path, keep_last: int, mode: str = "rename") -> None:
    """Delete all but the newest `keep_last` committed checkpoints, so that a crash mid-delete
    never leaves a broken "committed" one: `rename` moves a directory out of the `step-N`
    namespace first; `manifest` (buckets, where a rename copies) deletes its manifest first."""
    committed = [s for s in list_step_dirs(run_dir) if s.committed]
    for s in committed[:-keep_last]:
        if mode == "manifest":
            (s.path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(s.path, ignore_errors=True)
            continue
        doomed = s.path.with_name(s.path.name + DELETING_SUFFIX)
        os.replace(s.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


@dataclass
class SaveHandle:
    """A save in progress: `wait()` returns the committed directory (None if that step was
    committed already) or raises what the save raised."""

    step: int
    thread: threading.Thread | None = None
    result: Path | None = None
    error: BaseException | None = None
    blocked_s: float = 0.0
    """How long the caller waited for `save` to return (the copy to host memory)."""
    total_s: float | None = None
    """From `save` to the commit."""
    _waited: bool = field(default=False, repr=False)

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def wait(self) -> Path | None:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None and not self._waited:
            self._waited = True
            raise self.error
        return self.result


@dataclass
class _Job:
    """What the write-and-commit part of one save needs, captured when it began."""

    step: int
    write_dir: Path
    final: Path
    files: list[tuple[str, Any]]  # (path, host copy of the state) from the checkpoint engine
    rank: int
    rank_state: bytes
    before_commit: Callable[[], None] | None
    t0: float


class Checkpointer:
    def __init__(self, run_dir: Path, *, rank: int, world_size: int, meta: dict[str, Any], keep_last: int,
                 mode: str | None = None, pin_memory: bool = False):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.meta = meta  # layout and recipe fingerprint, recorded in every manifest
        self.keep_last = keep_last
        self.mode = mode or commit_mode(checkpoints_dir(self.run_dir))
        self.pin_memory = pin_memory
        self.last_save_s: float | None = None
        """Seconds from the start of the last finished save to its commit."""
        self.last_blocked_s: float | None = None
        """Seconds training waited for the last save (the copy to host memory)."""
        self._inflight: SaveHandle | None = None
        self._group: Any = None

    # --- save ----------------------------------------------------------------------------
    def save(self, engine: Any, step: int, rank_state: dict[str, Any], *,
             before_commit: Callable[[], None] | None = None, background: bool = False) -> Any:
        """Copy the state to host memory, then write, agree and commit.

        Returns the committed directory (None if it existed already), or with `background` a
        `SaveHandle` at once, the writing going on in a thread. A save still in flight is waited
        for first: at most one at a time. `before_commit` runs on every rank after all files are
        durable and may raise (a second signal) to abandon the save: nothing is committed and
        what was written is cleaned up next time."""
        self.wait()
        t0 = time.time()
        group = self._side_group()
        root = checkpoints_dir(self.run_dir)
        final = root / step_tag(step)
        write_dir = final.with_name(final.name + TMP_SUFFIX) if self.mode == "rename" else final
        skip = False
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            skip = any(s.committed and s.step == step for s in list_step_dirs(self.run_dir))
            if not skip:
                shutil.rmtree(write_dir, ignore_errors=True)  # a crashed save of this same step
        # One decision for all ranks: no rank may go on to write while another has given up.
        if broadcast(skip):
            return SaveHandle(step) if background else None
        from launcher.checkpoint.ds_engine import install

        captured = install(engine, pin=self.pin_memory)
        engine.save_checkpoint(str(root), tag=write_dir.name, save_latest=False)
        job = _Job(step, write_dir, final, captured.take(), self.rank,
                   (json.dumps(rank_state) + "\n").encode(), before_commit, t0)
        handle = SaveHandle(step, blocked_s=time.time() - t0)
        self.last_blocked_s = handle.blocked_s
        if not background:
            self._run(job, group, handle)
            return handle.wait()
        handle.thread = threading.Thread(target=self._run, args=(job, group, handle),
                                         name=f"checkpoint-save-{step}", daemon=True)
        self._inflight = handle
        handle.thread.start()
        return handle

    def wait(self) -> Path | None:
        """Wait for the save in flight, if any (a preemption and the end of training call this);
        raises what it raised."""
        handle, self._inflight = self._inflight, None
        return handle.wait() if handle is not None else None

    @property
    def saving(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    def _side_group(self) -> Any:
        """A gloo group of every rank for the save's own collectives, which may run in a
        background thread while training uses the default group (created at the first save,
        which every rank makes)."""
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _run(self, job: _Job, group: Any, handle: SaveHandle) -> None:
        try:
            handle.result = self._write_and_commit(job, group)
        except BaseException as e:  # noqa: BLE001  (raised again by wait())
            handle.error = e
        handle.total_s = time.time() - job.t0
        self.last_save_s = handle.total_s

    def _write_and_commit(self, job: _Job, group: Any) -> Path:
        digests, error = {}, None
        try:
            digests = _write_files(job)
        except Exception as e:  # noqa: BLE001  (every rank must still reach the gather)
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (digests, error), group=group)
        errors = [err for _, err in gathered if err]
        if errors:
            raise RuntimeError(f"checkpoint step {job.step} not saved: " + "; ".join(errors))
        abort = None
        if job.before_commit:
            try:
                job.before_commit()
            except BaseException as e:  # noqa: BLE001
                abort = e
        votes: list[Any] = [None] * self.world_size
        dist.all_gather_object(votes, abort is not None, group=group)
        if any(votes):
            if abort is not None:
                raise abort
            from launcher.checkpoint.preempt import SaveAborted

            raise SaveAborted("another rank abandoned the save")
        if self.rank == 0:
            self._commit(job, {k: v for part, _ in gathered for k, v in part.items()})
        dist.barrier(group=group)
        return job.final

    def _commit(self, job: _Job, digests: dict[str, dict[str, Any]]) -> None:
        """Rank 0: check the listing against what the ranks wrote, write the manifest (the
        commit), rename where that is cheap, point `latest` at it and prune."""
        listed = set(checkpoint_files(job.write_dir))
        missing = sorted(set(digests) - listed)
        if missing:
            raise RuntimeError(f"{job.write_dir}: {missing[0]} was written but is not there")
        for rel in sorted(listed - set(digests)):  # written by someone else (DeepSpeed itself)
            digests[rel] = file_digest(job.write_dir / rel)
        write_manifest(job.write_dir, digests, {"step": job.step, "time": time.time(), **self.meta})
        fsync_dir(job.write_dir)
        root = job.final.parent
        if job.write_dir != job.final:
            os.replace(job.write_dir, job.final)
            fsync_dir(root)
        atomic_write_text(root / LATEST, job.final.name + "\n")
        prune(self.run_dir, self.keep_last, self.mode)

    # --- load ----------------------------------------------------------------------------
    def find_resume(self) -> StepDir | None:
        """Rank 0 picks the newest committed checkpoint and removes leftovers; all ranks agree."""
        choice = None
        if self.rank == 0:
            clean_uncommitted(self.run_dir)
            choice = latest_committed(self.run_dir)
        return broadcast(choice)

    def load_same_layout(self, engine: Any, step_dir: StepDir) -> dict[str, Any]:
        """DeepSpeed's own loader for an unchanged layout, reading through `safe_load` (the
        launcher's checkpoint engine): nothing but tensors and plain data is unpickled."""
        from launcher.checkpoint.ds_engine import install

        install(engine, pin=self.pin_memory)
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


def _write_files(job: _Job) -> dict[str, dict[str, Any]]:
    """This rank's files of the save, each hashed as it is written and fsynced."""
    from launcher.checkpoint.ds_engine import write_state

    job.write_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for path, state in job.files:
        rel = os.path.relpath(path, job.write_dir)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        out[rel] = write_state(path, state)
    job.files.clear()  # the host copies go as soon as they are on disk
    out[rank_file(job.rank)] = write_hashed(job.write_dir / rank_file(job.rank), job.rank_state)
    delay = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0)
    if delay > 0:  # fault injection: scripts/kill-test.py makes tiny saves last long enough to kill
        time.sleep(delay)
    return out
