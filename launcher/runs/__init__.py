"""The run registry shared by every backend: which runs exist, where, in what state.

SQLite at `$LAUNCHER_STATE_DIR/runs.db` (default `~/.local/state/launcher/runs.db`, or
`$XDG_STATE_HOME/launcher/runs.db`); `launcher status` prints it as a table.
"""

from launcher.runs.local import track_local_run
from launcher.runs.registry import TERMINAL, Registry, RunRecord, default_db_path, new_run_id

__all__ = ["TERMINAL", "Registry", "RunRecord", "default_db_path", "new_run_id", "track_local_run"]
