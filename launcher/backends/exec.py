"""The one seam through which backends run scheduler commands (`sbatch`, `squeue`, `sacct`,
`scancel`, ...). Tests replace `RUNNER` to script the scheduler's answers; nothing else in the
backends calls `subprocess`.

Commands are argument lists, never shell strings, and inherit the caller's environment (so the
scheduler passes secrets such as HF_TOKEN on to the job without them being written anywhere).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Callable, Sequence

from launcher.errors import UserError


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _subprocess_runner(args: list[str], stdin: str | None, timeout: float) -> Result:
    try:
        p = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UserError(
            f"{args[0]}: command not found; run this where the scheduler's commands are installed"
        ) from None
    except subprocess.TimeoutExpired:
        return Result(list(args), 124, "", f"{args[0]} did not answer within {timeout:.0f}s")
    return Result(list(args), p.returncode, p.stdout, p.stderr)


RUNNER: Callable[[list[str], str | None, float], Result] = _subprocess_runner
"""Replaced in tests by a fake scheduler."""


def run(args: Sequence[str], *, stdin: str | None = None, timeout: float = 60.0) -> Result:
    """Run one command and capture its output; a missing program is a UserError."""
    return RUNNER([str(a) for a in args], stdin, timeout)


def check(args: Sequence[str], *, stdin: str | None = None, timeout: float = 60.0) -> Result:
    """`run`, and a non-zero exit becomes a UserError quoting the command's own message."""
    res = run(args, stdin=stdin, timeout=timeout)
    if not res.ok:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise UserError(f"{args[0]} failed (exit {res.returncode}): {msg[-1] if msg else 'no message'}")
    return res
