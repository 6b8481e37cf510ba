"""SQLite run registry: one row per run, plus its status history.

A run is recorded when it is submitted (or, for local runs, when it starts); backends update it
as they learn more (`launcher status` asks the scheduler for runs that have not ended).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from launcher.errors import UserError

STATUSES = ("pending", "running", "preempted", "completed", "failed", "cancelled", "timeout")
TERMINAL = frozenset({"completed", "failed", "cancelled", "timeout"})
"""Statuses after which nothing about a run changes any more."""


def default_db_path() -> Path:
    """`$LAUNCHER_STATE_DIR/runs.db`, else `$XDG_STATE_HOME/launcher/runs.db`, else
    `~/.local/state/launcher/runs.db`."""
    if os.environ.get("LAUNCHER_STATE_DIR"):
        return Path(os.environ["LAUNCHER_STATE_DIR"]) / "runs.db"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "launcher" / "runs.db"


def new_run_id(name: str) -> str:
    """`<recipe name>-<YYYYmmdd-HHMMSS>-<4 hex>`: sortable by time, unique without a lock."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass
class RunRecord:
    run_id: str
    name: str
    backend: str
    run_dir: str
    status: str = "pending"
    recipe: str | None = None
    """Path of the recipe file the run was started from (the resolved copy is in the run dir)."""
    cluster: str | None = None
    """Cluster profile path (remote backends)."""
    job_ids: list[str] = field(default_factory=list)
    """The backend's job ids, oldest first (Slurm keeps one id across requeues)."""
    restarts: int = 0
    latest_checkpoint: str | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    gpu_hours: float = 0.0
    usd_per_gpu_hour: float | None = None
    usd: float | None = None
    exit_code: int | None = None
    detail: str | None = None
    """Last thing worth telling about the status (e.g. the scheduler's reason)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = [f.name for f in fields(RunRecord)]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY, name TEXT NOT NULL, backend TEXT NOT NULL, run_dir TEXT NOT NULL,
  status TEXT NOT NULL, recipe TEXT, cluster TEXT, job_ids TEXT NOT NULL DEFAULT '[]',
  restarts INTEGER NOT NULL DEFAULT 0, latest_checkpoint TEXT, submitted_at REAL, started_at REAL,
  ended_at REAL, nodes INTEGER NOT NULL DEFAULT 1, gpus_per_node INTEGER NOT NULL DEFAULT 0,
  gpu_hours REAL NOT NULL DEFAULT 0, usd_per_gpu_hour REAL, usd REAL, exit_code INTEGER, detail TEXT
);
CREATE TABLE IF NOT EXISTS status_history (
  run_id TEXT NOT NULL REFERENCES runs(run_id), time REAL NOT NULL, status TEXT NOT NULL, detail TEXT
);
CREATE INDEX IF NOT EXISTS status_history_run ON status_history(run_id, time);
"""


class Registry:
    """The runs database. Every method opens and closes its own short transaction, so several
    `launcher` processes can share one file."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_db_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise UserError(
                f"run registry {self.path}: cannot open ({e}); set LAUNCHER_STATE_DIR to a writable directory"
            ) from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    @staticmethod
    def _row(row: sqlite3.Row) -> RunRecord:
        data = dict(row)
        data["job_ids"] = json.loads(data["job_ids"] or "[]")
        return RunRecord(**data)

    def add(self, run: RunRecord, *, detail: str | None = None) -> RunRecord:
        data = run.to_json()
        data["job_ids"] = json.dumps(run.job_ids)
        with self._connect() as db:
            db.execute(
                f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                [data[c] for c in _COLUMNS],
            )
            db.execute(
                "INSERT INTO status_history VALUES (?, ?, ?, ?)", (run.run_id, time.time(), run.status, detail)
            )
        return run

    def update(self, run_id: str, **changes: Any) -> RunRecord:
        """Change fields of a run; a new `status` is appended to its history."""
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise TypeError(f"unknown run fields: {sorted(unknown)}")
        if "status" in changes and changes["status"] not in STATUSES:
            raise ValueError(f"unknown status {changes['status']!r}")
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            old = self._row(row)
            if "job_ids" in changes:
                changes["job_ids"] = json.dumps(changes["job_ids"])
            if changes:
                db.execute(
                    f"UPDATE runs SET {', '.join(f'{k} = ?' for k in changes)} WHERE run_id = ?",
                    [*changes.values(), run_id],
                )
            if "status" in changes and changes["status"] != old.status:
                db.execute(
                    "INSERT INTO status_history VALUES (?, ?, ?, ?)",
                    (run_id, time.time(), changes["status"], changes.get("detail")),
                )
            return self._row(db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone())

    def get(self, run_id: str) -> RunRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return self._row(row) if row else None

    def find(self, key: str) -> RunRecord:
        """A run by its id, a unique prefix of it, or its run directory; a UserError otherwise."""
        run = self.get(key)
        if run:
            return run
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM runs WHERE run_id LIKE ? ESCAPE '\\' OR run_dir = ? ORDER BY submitted_at",
                (key.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%", str(Path(key).absolute())),
            ).fetchall()
        if len(rows) == 1:
            return self._row(rows[0])
        if not rows:
            raise UserError(f"no run '{key}' in the registry {self.path}: see `launcher status`")
        raise UserError(f"'{key}' matches {len(rows)} runs: give more of the run id")

    def by_run_dir(self, run_dir: str | Path) -> RunRecord | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM runs WHERE run_dir = ? ORDER BY submitted_at DESC LIMIT 1",
                (str(Path(run_dir).absolute()),),
            ).fetchone()
        return self._row(row) if row else None

    def list(self, limit: int | None = None) -> list[RunRecord]:
        """Runs, newest first."""
        sql = "SELECT * FROM runs ORDER BY COALESCE(submitted_at, started_at) DESC"
        with self._connect() as db:
            rows = db.execute(sql + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
        return [self._row(r) for r in rows]

    def history(self, run_id: str) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT time, status, detail FROM status_history WHERE run_id = ? ORDER BY time, rowid", (run_id,)
            ).fetchall()
        return [dict(r) for r in rows]

    def __iter__(self) -> Iterator[RunRecord]:
        return iter(self.list())


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The tag named by `<run_dir>/checkpoints/latest` (the committed checkpoint), if any."""
    path = Path(run_dir) / "checkpoints" / "latest"
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None
