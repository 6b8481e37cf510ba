"""The manifest: every file of a checkpoint with its size and sha256. Writing it is the commit;
verifying against it finds a truncated or corrupted file by name, before anything unpickles it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from launcher.checkpoint.layout import MANIFEST, atomic_write_text

FORMAT_VERSION = 1
_CHUNK = 8 * 1024 * 1024


def file_digest(path: Path, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    return {"size": size, "sha256": h.hexdigest()}


def checkpoint_files(step_dir: Path) -> list[str]:
    """Relative paths of the files a manifest covers (all but the manifest itself)."""
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(step_dir: Path, files: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    doc = {"format": FORMAT_VERSION, **meta, "files": dict(sorted(files.items()))}
    atomic_write_text(step_dir / MANIFEST, json.dumps(doc, indent=1) + "\n")


def read_manifest(step_dir: Path) -> dict[str, Any]:
    from launcher.errors import UserError

    path = step_dir / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{step_dir}: not a committed checkpoint (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        raise UserError(f"{path}: not a launcher checkpoint manifest")
    return doc


@dataclass
class Problem:
    file: str
    what: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"


def check_file(step_dir: Path, rel: str, want: dict[str, Any], *, checksums: bool = True,
               progress: Callable[[int], None] | None = None) -> Problem | None:
    """What is wrong with one file of a checkpoint, or None."""
    path = step_dir / rel
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Problem(str(path), "missing")
    if size != want["size"]:
        return Problem(str(path), f"size {size} bytes, manifest says {want['size']} (truncated or rewritten)")
    if checksums and file_digest(path, progress)["sha256"] != want["sha256"]:
        return Problem(str(path), "checksum does not match the manifest (corrupted)")
    return None


def verify(step_dir: Path, *, checksums: bool = True, progress: Callable[[int], None] | None = None,
           workers: int = 1) -> list[Problem]:
    """Files that are missing, of the wrong size or (with `checksums`) the wrong content; with
    `workers` > 1 the files are hashed on threads (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    items = list(read_manifest(step_dir)["files"].items())

    def check(item: tuple[str, dict[str, Any]]) -> Problem | None:
        return check_file(step_dir, item[0], item[1], checksums=checksums, progress=progress)

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(check, items))
    else:
        results = [check(i) for i in items]
    return [r for r in results if r]
