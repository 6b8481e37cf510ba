"""One run, one writer: a run directory is locked while any process of its run is alive.

Two `launcher run`/`resume` on the same directory would race each other's checkpoints and
metrics. The driver holds an exclusive `flock` on `.<run>.lock` beside the run directory (beside
it, not in it: `--no-resume` renames the directory, and the lock must stay with the name) and
writes who holds it there. Each training worker holds a shared lock on `.<run>.workers.lock`, so a
new driver also sees workers that outlived theirs. The kernel drops a lock when its holder dies,
however it dies: a SIGKILLed run leaves no stale lock behind.

Filesystems without `flock` (some FUSE bucket mounts) cannot be locked; the run goes on with a
warning, as before this lock existed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from launcher.errors import UserError

WORKERS_GONE_WAIT_S = 15.0
"""How long a new driver waits for workers of a dead driver to be reaped before refusing."""


def lock_path(run_dir: Path, kind: str = "") -> Path:
    run_dir = run_dir.resolve()
    return run_dir.parent / f".{run_dir.name}{'.' + kind if kind else ''}.lock"


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not h:
        return "another process"
    return f"{h.get('command', 'launcher')} (pid {h.get('pid')} on {h.get('host')}, since {h.get('since')})"


def _try_flock(fd: int, how: int, path: Path) -> bool:
    """True if locked (or the filesystem cannot lock: warned), False if another process holds it."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            print(f"launcher: warning: {path.parent} cannot be locked ({e.strerror}): nothing stops "
                  "a second run on this directory", file=sys.stderr)
            return True
        raise


def _workers_gone(run_dir: Path) -> bool:
    """Wait (a while) until no worker of an earlier run holds the workers' lock."""
    path = lock_path(run_dir, "workers")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + WORKERS_GONE_WAIT_S
        while not _try_flock(fd, fcntl.LOCK_EX, path):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


@contextmanager
def hold_run(run_dir: Path, command: str) -> Iterator[None]:
    """Hold `run_dir` for this driver; UserError (exit 2) naming the holder if another has it."""
    run_dir.resolve().parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(run_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_flock(fd, fcntl.LOCK_EX, path):
            raise UserError(
                f"{run_dir} is in use by {_holder(path)}: wait for that run to end or stop it "
                "(Ctrl-C, `launcher stop RUN_ID`, or kill the pid); two runs on one directory would "
                "overwrite each other's checkpoints. Use another --run-dir to train beside it")
        if not _workers_gone(run_dir):
            raise UserError(
                f"{run_dir}: workers of an earlier run are still alive (they hold "
                f"{lock_path(run_dir, 'workers')}); their driver is gone. Stop them (`ray stop`, or "
                "kill the RayTrainWorker processes) and run again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock


_worker_fd: int | None = None


def hold_as_worker(run_dir: Path) -> None:
    """Called once in each training worker: a shared hold on the run for this process's life
    (released by the kernel when it exits, however it exits)."""
    global _worker_fd
    if _worker_fd is not None:
        return
    path = lock_path(run_dir, "workers")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # blocks only while a new driver checks (a moment)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    _worker_fd = fd


DRIVER_ENV = "LAUNCHER_DRIVER"
"""host:pid of the driver, set in each worker: a worker on the driver's host checks it is alive
before it commits a checkpoint."""


def driver_gone() -> bool:
    """True when this worker's driver ran on this host and is dead (SIGKILLed, OOM-killed): the
    reaper stops the workers within a second, and no commit may land meanwhile."""
    from launcher.pids import pid_alive

    host, _, pid = os.environ.get(DRIVER_ENV, "").rpartition(":")
    if not pid or host != socket.gethostname():
        return False
    return not pid_alive(int(pid))
