"""Nothing of a run's private Ray cluster outlives its driver.

Ray starts its GCS, raylet, agents and the training workers as descendants of the driver; they
change process group, and when the driver dies without `ray.shutdown()` (SIGKILL, the OOM
killer) they are reparented and go on: the workers train and commit for seconds until Ray
notices, the dashboard and runtime-env agents stay forever. The reaper is a small process the
driver starts right after Ray: it notes the driver's descendants every `INTERVAL_S`, and when the
driver is gone (its end of a pipe closes, however it died) or has shut Ray down, it kills every
process it noted that is still that process (same pid and start time).

Only for the private cluster the driver started; a cluster it joined is not the run's to reap.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from typing import Any

INTERVAL_S = 0.5


def start() -> subprocess.Popen:
    """The reaper of this process's descendants; close its stdin (or exit) to set it off."""
    return subprocess.Popen(
        [sys.executable, "-m", "launcher.runtime.reaper", str(os.getpid())],
        stdin=subprocess.PIPE,
        # its own session: a Ctrl-C in the terminal reaches the run, not the reaper
        start_new_session=True,
        close_fds=True,
    )


def release(reaper: subprocess.Popen | None, timeout: float = 30.0) -> None:
    """After `ray.shutdown()`: the reaper kills what Ray left and exits."""
    if reaper is None:
        return
    try:
        reaper.stdin.close()
        reaper.wait(timeout)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _watch(driver_pid: int) -> dict[int, Any]:
    """The driver's descendants, noted until the driver is gone or closes the pipe."""
    import psutil

    known: dict[int, Any] = {}
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return known
    while True:
        try:
            for child in driver.children(recursive=True):
                known.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            return known
        ready, _, _ = select.select([sys.stdin], [], [], INTERVAL_S)
        if ready and not os.read(sys.stdin.fileno(), 1):
            return known  # EOF: the driver released us, or died (the kernel closed its end)


def reap(known: dict[int, Any]) -> int:
    """Kill every noted process that still runs (is_running compares the start time too, so a
    reused pid is left alone). Returns how many were killed."""
    import psutil

    alive = [p for p in known.values() if p.pid != os.getpid() and p.is_running()]
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return len(alive)


def main() -> None:
    reap(_watch(int(sys.argv[1])))


if __name__ == "__main__":
    main()
