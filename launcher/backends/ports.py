"""`python -m launcher.backends.ports IP OWNER_PID SIZE FIRST LAST PREFERRED`: reserve a block of
SIZE free TCP ports on this node's address IP for one Ray node of a job, and print its first port
(PREFERRED is a port: the block holding it is tried first).

Two jobs sharing a node must not pick the same ports (Ray then fails, or worse, a worker joins
the other job's cluster). Deriving ports from the job id alone collides as soon as two job ids
agree modulo the number of slots, so every candidate block is
1. reserved: a lock directory `<lock_root>/<IP>-<first port>` made with mkdir (atomic, so two
   jobs starting at the same moment cannot both win), holding the owner's pid; a lock whose owner
   is gone is taken over;
2. probed: every port of the block is bound on IP; one in use by anything else skips the block.
The search starts at PREFERRED (the job id's slot, so the usual answer stays predictable) and walks
the slots between FIRST and LAST. The lock names the address, so nodes that share /tmp but not a
network (the namespaces of cluster/dev/slurm-up.sh) do not block each other.

The job script records the answer in its events (`ray_ports`), and the lock goes with its owner.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path

from launcher.pids import pid_alive

LOCK_ROOT_ENV = "LAUNCHER_PORT_LOCKS"
"""Where the locks live; default `/tmp/launcher-ray-ports` (node-local on a real cluster)."""


def _lock(root: Path, ip: str, first: int, owner: int) -> bool:
    """Take the lock of the block at `first`, or take over one whose owner has gone."""
    path = root / f"{ip}-{first}"
    for _ in range(2):
        try:
            path.mkdir()
        except FileExistsError:
            try:
                holder = int((path / "pid").read_text())
            except (OSError, ValueError):
                return False  # being written by its owner right now
            if pid_alive(holder):
                return False
            try:  # a stale lock: remove it and try once more
                (path / "pid").unlink(missing_ok=True)
                path.rmdir()
            except OSError:
                return False
            continue
        (path / "pid").write_text(str(owner))
        return True
    return False


def _unlock(root: Path, ip: str, first: int) -> None:
    path = root / f"{ip}-{first}"
    (path / "pid").unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass


def _free(ip: str, first: int, size: int) -> bool:
    socks = []
    try:
        for port in range(first, first + size):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((ip, port))  # no SO_REUSEADDR: a port in TIME_WAIT counts as taken
        return True
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            return False
        raise
    finally:
        for s in socks:
            s.close()


def reserve(ip: str, owner: int, size: int, first: int, last: int, preferred: int,
            lock_root: Path | None = None) -> int | None:
    """The first port of a block of `size` free ports on `ip` between `first` and `last`, locked
    for `owner`; None when every block is taken."""
    root = lock_root or Path(os.environ.get(LOCK_ROOT_ENV) or "/tmp/launcher-ray-ports")
    root.mkdir(parents=True, exist_ok=True)
    slots = max(1, (last + 1 - first) // size)
    start = max(0, preferred - first) // size
    for i in range(slots):
        base = first + ((start + i) % slots) * size
        if not _lock(root, ip, base, owner):
            continue
        if _free(ip, base, size):
            return base
        _unlock(root, ip, base)
    return None


def block_size(cpus: int) -> int:
    """Ports one Ray node needs: 10 for its daemons, and one per worker process Ray may start
    (about two per CPU with Ray Train's actors and tasks, at least 90), rounded to hundreds."""
    need = 10 + max(90, 2 * cpus)
    return -(-need // 100) * 100


def main(argv: list[str]) -> int:
    if len(argv) != 6:
        print(__doc__, file=sys.stderr)
        return 2
    ip, owner, size, first, last, preferred = argv[0], *(int(a) for a in argv[1:])
    base = reserve(ip, owner, size, first, last, preferred)
    if base is None:
        print(f"launcher: no block of {size} free ports on {ip} between {first} and {last}", file=sys.stderr)
        return 1
    print(base)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
