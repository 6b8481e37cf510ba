"""Preemption: turn SIGTERM/SIGINT/SIGUSR1 into "finish the step, commit a checkpoint, exit 75".

The driver is the process that schedulers signal (Slurm's batch shell forwards `--signal`; a
terminal's Ctrl-C). It writes a stop request into the run directory, which every rank checks
after each step; the ranks agree through the step's all-reduce, so they all stop after the same
step. Ranks that receive a signal themselves (a cloud's SIGTERM to every process) raise the same
flag. A second signal aborts: a save in progress is never committed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

STOP_FILE = ".stop"
PREEMPTED_FILE = "preempted.json"
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# Seconds between the notice and the hard kill, by platform (see docs/checkpoints.md).
WINDOWS_S = {"aws": 120.0, "gcp": 30.0, "azure": 30.0, "slurm": 30.0, "local": 120.0}


def notice_window_s(configured: float | None, env: dict[str, str] | None = None) -> float:
    """The recipe's `checkpoint.preempt_window_s`; else `LAUNCHER_PREEMPT_WINDOW_S` (backends
    set it: Slurm from the `--signal` lead time, SkyPilot from the cloud); else a guess from
    the environment."""
    env = dict(os.environ) if env is None else env
    if configured is not None:
        return float(configured)
    if env.get("LAUNCHER_PREEMPT_WINDOW_S"):
        return float(env["LAUNCHER_PREEMPT_WINDOW_S"])
    cloud = (env.get("SKYPILOT_CLOUD") or env.get("LAUNCHER_CLOUD") or "").lower()
    if cloud in WINDOWS_S:
        return WINDOWS_S[cloud]
    if env.get("SLURM_JOB_ID"):
        return WINDOWS_S["slurm"]  # Slurm's default KillWait
    return WINDOWS_S["local"]


def request_stop(run_dir: Path, signum: int, window_s: float, *, abort: bool = False) -> None:
    """Ask every rank to stop after its current step (`abort`: and to commit nothing more)."""
    now = time.time()
    doc = {"signal": signal.Signals(signum).name, "time": now, "deadline": now + window_s}
    if abort:
        doc["abort"] = True
    tmp = run_dir / f"{STOP_FILE}.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, run_dir / STOP_FILE)


def read_stop(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / STOP_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def record_abort(run_dir: Path, signal_name: str) -> None:
    """The driver's record of a stop it did not wait for (a second signal): the last logged step,
    nothing committed by this stop. A record the ranks already wrote is kept."""
    from launcher.runtime.metrics import METRICS_FILE, read_metrics

    path = run_dir / PREEMPTED_FILE
    if path.exists():
        return
    steps = [r["step"] for r in read_metrics(run_dir / METRICS_FILE) if "loss" in r and not r.get("eval")]
    doc = {"step": steps[-1] if steps else 0, "signal": signal_name, "time": time.time(),
           "committed": None, "aborted": True}
    path.write_text(json.dumps(doc) + "\n")


def clear(run_dir: Path) -> None:
    for name in (STOP_FILE, PREEMPTED_FILE):
        try:
            (run_dir / name).unlink()
        except FileNotFoundError:
            pass


class SaveAborted(Exception):
    """A second signal arrived while a checkpoint was being written; it is not committed."""


class WorkerSignals:
    """Signal flags of one training rank. Handlers can only be installed from the main thread;
    where the loop runs in another thread (Ray Train), the driver's stop file is the channel."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.signal_time: float | None = None
        self.signal_name: str | None = None
        self.count = 0
        self.saving = False
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.signal_time is None:
            self.signal_time = time.time()
            self.signal_name = signal.Signals(signum).name
        elif self.saving:
            raise SaveAborted(f"second {signal.Signals(signum).name} during the save")

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def stop_signal(self, run_dir: Path) -> str | None:
        """The signal behind the stop: this rank's own, else the one named in the driver's request."""
        if self.signal_name is not None:
            return self.signal_name
        stop = read_stop(run_dir)
        return stop.get("signal") if stop else None

    def deadline(self, run_dir: Path) -> float | None:
        """When this rank must be gone, or None if no stop was requested."""
        stop = read_stop(run_dir)
        times = []
        if stop:
            times.append(float(stop["deadline"]))
        if self.signal_time is not None:
            times.append(self.signal_time + self.window_s)
        return min(times) if times else None

    def aborted(self, run_dir: Path) -> bool:
        stop = read_stop(run_dir)
        return self.count > 1 or bool(stop and stop.get("abort"))
