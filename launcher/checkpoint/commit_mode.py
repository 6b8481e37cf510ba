"""How a checkpoint is committed where it is written.

- `rename` (local and shared filesystems): every rank writes into `step-N.tmp/`, the manifest
  goes in last, and the directory is renamed to `step-N` (one metadata operation).
- `manifest` (object stores mounted through FUSE, such as SkyPilot's bucket mounts): a rename is a
  server-side copy of every object, so files are written straight into `step-N/`, the manifest,
  written last, marks the commit (`layout.list_step_dirs` counts nothing without one), and pruning
  deletes (manifest first) instead of renaming out of the way.

`LAUNCHER_CKPT_COMMIT=rename|manifest` overrides the detection (a backend that knows it writes
to a bucket sets it).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "LAUNCHER_CKPT_COMMIT"
MODES = ("rename", "manifest")

# Filesystem types of bucket mounts: gcsfuse, mountpoint-s3, goofys, s3fs, rclone, blobfuse2,
# JuiceFS and friends all show up as fuse.<name> (or plain fuse / fuseblk).
_BUCKET_FS_PREFIXES = ("fuse",)
_NOT_BUCKETS = {"fuse.sshfs", "fuse.lxcfs", "fuse.portal", "fuse.gvfsd-fuse", "fuse.xdg-document-portal"}


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mount_fstype(path: str | Path, mountinfo: str | None = None) -> str | None:
    """The filesystem type of the mount holding `path` (Linux /proc/self/mountinfo), or None."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, fstype = "", None
    for line in mountinfo.splitlines():
        parts = line.split(" ")
        if " - " not in line or len(parts) < 5:
            continue
        point = _unescape(parts[4])
        after = line.split(" - ", 1)[1].split(" ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, after[0]
    return fstype


def is_bucket_mount(path: str | Path, mountinfo: str | None = None) -> bool:
    fstype = mount_fstype(path, mountinfo)
    return bool(fstype and fstype.startswith(_BUCKET_FS_PREFIXES) and fstype not in _NOT_BUCKETS)


def commit_mode(checkpoints_dir: str | Path, env: dict[str, str] | None = None,
                mountinfo: str | None = None) -> str:
    """`rename` or `manifest` for checkpoints written under `checkpoints_dir` (which may not exist
    yet: its nearest existing parent decides)."""
    env = os.environ if env is None else env
    forced = env.get(ENV, "").strip().lower()
    if forced:
        if forced not in MODES:
            from launcher.errors import UserError

            raise UserError(f"{ENV}={forced!r}: choose one of {', '.join(MODES)}")
        return forced
    p = Path(checkpoints_dir)
    while not p.exists() and p != p.parent:
        p = p.parent
    return "manifest" if is_bucket_mount(p, mountinfo) else "rename"
