"""Where prepared data sets live, what identifies one, and how one is committed.

A prepared data set is the directory `<cache_dir>/<fingerprint>/`. The fingerprint hashes
everything its tokens depend on: the source (each file's absolute path, size and mtime; a hub
id, config, revision and split; the synthetic generator's settings), the format settings, the
tokenizer (its whole serialised definition and chat template) and the sequence settings. A
changed source has another fingerprint, so it is prepared again and never mixed with the old.

It is built in a staging directory next to it (`.staging-<fingerprint>-<pid>-<random>`), every
file fsynced, `manifest.json` written last, then renamed into place in one step. A directory
counts only when its manifest is there and every file it lists has its listed size: a killed
prepare leaves at most a staging directory, which nothing reads; of two prepares racing, the
first rename wins and the second discards its copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from launcher.data.store import write_json
from launcher.pids import pid_alive

FORMAT_VERSION = 1
"""Bump when the files' meaning changes: every prepared data set is then prepared again."""

MANIFEST = "manifest.json"
STAGING = ".staging-"


def default_cache_dir() -> Path:
    """$LAUNCHER_DATA_CACHE, else $XDG_CACHE_HOME/launcher/data (~/.cache/launcher/data)."""
    if os.environ.get("LAUNCHER_DATA_CACHE"):
        return Path(os.environ["LAUNCHER_DATA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "launcher" / "data"


def cache_root(cache_dir: str | None) -> Path:
    """`data.cache_dir`, or the default under the user's cache directory (absolute: workers may
    run in another directory)."""
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()).absolute()


def fingerprint(inputs: dict[str, Any]) -> str:
    text = json.dumps({"format_version": FORMAT_VERSION, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def file_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.absolute()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of everything that decides the tokenizer's output."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps([special, tokenizer.chat_template, type(tokenizer).__name__]).encode())
    return h.hexdigest()[:24]


def problem(path: Path) -> str | None:
    """Why `path` is not a committed prepared data set (None: it is one)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest (not prepared, or a prepare that did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != size:
            return f"{rel} is missing or not {size} bytes"
    return None


def lookup(root: Path, fp: str) -> Path | None:
    """The committed data set with this fingerprint, if there is one."""
    path = root / fp
    return path if path.is_dir() and problem(path) is None else None


@contextmanager
def staging(root: Path, fp: str) -> Iterator[Path]:
    """A fresh directory to prepare in; removed when the block fails."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{STAGING}{fp}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def commit(stage: Path, root: Path, fp: str, manifest: dict[str, Any]) -> Path:
    """Write the manifest (listing every file with its size) last, then rename `stage` to
    `root/fp`. Returns the committed directory (another prepare's, if it won the race)."""
    files = {str(p.relative_to(stage)): p.stat().st_size for p in sorted(stage.rglob("*")) if p.is_file()}
    write_json(stage / MANIFEST, {**manifest, "fingerprint": fp, "format_version": FORMAT_VERSION,
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files})
    _fsync_dir(stage)
    final = root / fp
    if final.exists() and problem(final) is not None:
        # a directory there that is not committed cannot come from this code (renames are
        # whole); clear it rather than refuse forever
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(stage, final)
    except OSError:
        if lookup(root, fp) is None:
            raise
        shutil.rmtree(stage, ignore_errors=True)  # another prepare committed the same data first
    _fsync_dir(root)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_staging(root: Path, max_age_s: float = 24 * 3600) -> list[Path]:
    """Staging directories of prepares that died (their process, on this host, is gone) or that
    are a day old (a shared cache: another host's process cannot be asked)."""
    removed = []
    here = socket.gethostname()
    for p in root.glob(f"{STAGING}*") if root.is_dir() else []:
        try:
            host, pid = p.name[len(STAGING):].split("-", 1)[1].rsplit("-", 2)[:2]
            alive = pid_alive(int(pid)) if host == here else True
        except ValueError:
            continue
        if not alive or time.time() - p.stat().st_mtime > max_age_s:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


