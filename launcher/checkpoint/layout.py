"""Where checkpoints live in a run directory, and which of them count.

    RUN_DIR/checkpoints/
      latest                   name of the newest committed step directory (atomically replaced)
      step-00000200/           committed: renamed from .tmp after every rank finished writing
        manifest.json          every file with its size and sha256; its presence is the commit
        rank-00000.json        per-rank state: sampler, RNG, step, tokens (JSON, no pickle)
        ...                    DeepSpeed's own shards
      step-00000300.tmp/       being written, or left by a crash: never read, removed on resume

A step directory counts as committed only when its manifest is there AND every file it lists
is there with the listed size. On object storage (a bucket mounted by SkyPilot) a directory
rename is a copy, and an upload cut short by a preemption can leave the manifest next to missing
or partial files; such a directory is skipped by a resume, which falls back to the previous
committed checkpoint, and removed like a `.tmp` (sizes only: `manifest.verify` compares checksums).

DeepSpeed's own `latest` file is never written (`save_latest=False`): its rank 0 writes it
before the other ranks have finished.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

CKPT_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"
_STEP_RE = re.compile(r"^step-(\d{8,})$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class StepDir:
    step: int
    path: Path
    committed: bool
    problem: str | None = None
    """Why a directory with a manifest does not count: a listed file missing or of another size."""


_COMPLETE: set[tuple[str, int, int]] = set()
"""Manifests (path, mtime, size) already found complete: a committed checkpoint is stat-ed once
per process, not at every save's listing."""


def incomplete(step_dir: Path) -> str | None:
    """What is missing from a step directory that has a manifest, or None when every file the
    manifest lists is there with its size."""
    manifest = step_dir / MANIFEST
    try:
        st = manifest.stat()
        key = (str(manifest), st.st_mtime_ns, st.st_size)
        if key in _COMPLETE:
            return None
        files = json.loads(manifest.read_text())["files"]
        items = list(files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST}: unreadable ({e.__class__.__name__})"
    for rel, want in items:
        try:
            size = (step_dir / rel).stat().st_size
        except OSError:
            return f"{rel}: missing"
        if not isinstance(want, dict) or size != want.get("size"):
            return f"{rel}: {size} bytes, the manifest lists {want.get('size') if isinstance(want, dict) else want!r}"
    _COMPLETE.add(key)
    return None


def list_step_dirs(run_dir: Path) -> list[StepDir]:
    """Every step directory, committed or not (`.tmp`, renamed but without a manifest, or with a
    manifest listing files that are missing or of another size)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if not p.is_dir():
            continue
        name = p.name[: -len(TMP_SUFFIX)] if p.name.endswith(TMP_SUFFIX) else p.name
        step = step_of(name)
        if step is None:
            continue
        committed = not p.name.endswith(TMP_SUFFIX) and (p / MANIFEST).is_file()
        problem = incomplete(p) if committed else None
        out.append(StepDir(step, p, committed and problem is None, problem))
    return sorted(out, key=lambda s: (s.step, s.committed))


def latest_committed(run_dir: Path) -> StepDir | None:
    """The checkpoint to resume from: the one `latest` names if it is committed, else the newest
    committed step directory (a crash between the rename and `latest` leaves `latest` one
    behind; both are complete)."""
    committed = [s for s in list_step_dirs(run_dir) if s.committed]
    if not committed:
        return None
    newest = committed[-1]
    pointer = checkpoints_dir(run_dir) / LATEST
    try:
        named = pointer.read_text().strip()
    except OSError:
        return newest
    for s in committed:
        if s.path.name == named and s.step >= newest.step:
            return s
    return newest


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
