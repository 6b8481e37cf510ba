"""The manifest: every file of a checkpoint with its size and checksum (xxh3-128, computed while
the file was written; sha256 in checkpoints written before format 2). Writing it is the commit;
verifying against it finds a truncated or corrupted file by name."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from launcher.checkpoint.hashing import HASH, algo_of, digest_file
from launcher.checkpoint.layout import MANIFEST, atomic_write_text

FORMAT_VERSION = 2
"""1: sha256 sums computed by reading the files after the save; 2: xxh3-128 sums computed while
writing (both verify)."""


def file_digest(path: Path, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Size and checksum of a file, by reading it (what a save records, for files it did not write)."""
    return digest_file(path, HASH, progress)


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
    algo = algo_of(want)
    if checksums and algo is None:
        return Problem(str(path), "the manifest records no checksum for it")
    if checksums and digest_file(path, algo, progress)[algo] != want[algo]:
        return Problem(str(path), "checksum does not match the manifest (corrupted)")
    return None


def verify(step_dir: Path, *, checksums: bool = True, progress: Callable[[int], None] | None = None,
           workers: int = 1) -> list[Problem]:
    """Files that are missing, of the wrong size or (with `checksums`) the wrong content; with
    `workers` > 1 the files are read on threads in parallel, largest first."""
    from concurrent.futures import ThreadPoolExecutor

    items = sorted(read_manifest(step_dir)["files"].items(), key=lambda kv: -int(kv[1].get("size", 0)))

    def check(item: tuple[str, dict[str, Any]]) -> Problem | None:
        return check_file(step_dir, item[0], item[1], checksums=checksums, progress=progress)

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(check, items))
    else:
        results = [check(i) for i in items]
    return [r for r in results if r]
