"""Whether a process still lives, for locks that record their holder's pid (Ray port blocks,
data prepares): a holder that is gone leaves a lock that may be taken over."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True if `pid` exists on this host (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
