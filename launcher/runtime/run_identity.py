"""A run's identity for external trackers: one W&B id per run directory, kept across resumes.

The recipe name is not an id: two runs of one recipe would merge into one W&B run. The id is
created at a run's first start, stored in RUN_DIR/wandb_id and read back by every resume.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

WANDB_ID_FILE = "wandb_id"

# W&B run ids may not contain / \ # ? % : and are at most 64 characters.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def wandb_run_id(run_dir: Path, env: Mapping[str, str] | None = None) -> str:
    """The W&B id of the run in `run_dir`: the one stored there, else a new one stored once.

    A new id is the job's registry id (LAUNCHER_RUN_ID, set by the Slurm and SkyPilot job
    scripts) when there is one, so the id also survives a node that starts without the run
    directory (spot recovery); otherwise a random one. Once stored, the file wins: a run started
    by a job and resumed here keeps its id.
    """
    path = Path(run_dir) / WANDB_ID_FILE
    stored = _read(path)
    if stored:
        return stored
    env = os.environ if env is None else env
    fresh = _safe(env.get("LAUNCHER_RUN_ID", "")) or secrets.token_hex(6)
    return _create_once(path, fresh)


def _safe(run_id: str) -> str:
    return _UNSAFE.sub("-", run_id.strip())[:64].strip("-")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _create_once(path: Path, run_id: str) -> str:
    """Write `run_id` to `path` unless another process got there first; return the stored id.
    A link of a complete temporary file is atomic and fails if the name exists, so a reader never
    sees a half-written id and two starters agree on one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_text(run_id + "\n")
    try:
        os.link(tmp, path)
    except OSError:
        # taken (keep it), or a filesystem without hard links or an empty file left by hand:
        # replace is still atomic, the last of two racing writers wins
        if not _read(path):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path) or run_id
