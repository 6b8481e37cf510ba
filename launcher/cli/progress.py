"""Live training progress in the driver's terminal, from the run's metrics.jsonl.

Before the first step, the display names the phase the job is in ("starting Ray", "starting 2
workers", "building the model"): the driver announces its own phases through `Display.phase`,
and rank 0 writes its phase to RUN_DIR/.phase (see `launcher.runtime.driver.write_phase`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from launcher.runtime.driver import PHASE_FILE
from launcher.runtime.metrics import METRICS_FILE


class _Tail:
    """Reads new complete lines of a growing file. A file replaced or cut shorter (a resume
    truncates metrics.jsonl to the checkpoint's step) is read again from its start."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = ""
        self.inode: int | None = None

    def lines(self) -> list[dict]:
        try:
            f = open(self.path)
        except FileNotFoundError:
            return []
        with f:
            st = os.fstat(f.fileno())
            if st.st_ino != self.inode or st.st_size < self.offset:
                self.inode, self.offset, self.partial = st.st_ino, 0, ""
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        text = self.partial + chunk
        *complete, self.partial = text.split("\n")
        out = []
        for line in complete:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out


class Display:
    """What the driver shows while a job runs: phases, then steps. On a terminal a live progress
    bar whose description is the phase; elsewhere one plain line per phase and every tenth step.
    Records older than `since` (those of the run being resumed) only set the bar's position."""

    def __init__(self, console: Console, since: float | None = None) -> None:
        self.console = console
        self.since = time.time() if since is None else since
        self.history = False
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self.task = self.progress.add_task("starting", total=None, loss="-", tps="-")
        self.total: int | None = None
        self.training = False
        self.last_phase: str | None = None
        self.lock = threading.Lock()  # phases come from the driver's thread and the tail's

    def phase(self, text: str) -> None:
        """Announce what the job is doing until the first step (later phases are ignored)."""
        with self.lock:
            if self.training or text == self.last_phase:
                return
            self.last_phase = text
            if self.live:
                self.progress.update(self.task, description=escape(text))
                self.progress.refresh()  # shown now, however short the phase
            else:
                self.console.print(text, markup=False, highlight=False)

    def _train(self) -> None:
        with self.lock:
            if not self.training:
                self.training = True
                self.progress.update(self.task, description="train")

    def record(self, rec: dict) -> None:
        if "time" in rec:  # eval lines have none: they go with the step before them
            self.history = rec["time"] < self.since
        if self.history:  # the run being resumed, from before this display started
            if rec.get("event") == "start":
                self.total = rec["total_steps"]
                self.progress.update(self.task, total=rec["total_steps"])
            elif "loss" in rec and not rec.get("eval"):
                self.progress.update(self.task, completed=rec["step"])
            return
        if rec.get("event") == "start":
            self.total = rec["total_steps"]
            self.progress.update(self.task, total=rec["total_steps"])
            if not self.live:
                self.console.print(f"training: {rec['total_steps']} steps on {rec['world_size']} workers")
        elif rec.get("event") == "resume":
            if rec.get("total_steps"):  # the resumed run's own end, which an override may have moved
                self.total = rec["total_steps"]
                self.progress.update(self.task, total=rec["total_steps"])
            if not self.live:
                self.console.print(f"resumed at step {rec['step']} on {rec['world_size']} workers",
                                   highlight=False)
        elif rec.get("eval"):
            self.console.print(f"  step {rec['step']}: eval loss {rec['eval_loss']:.4f}")
        elif "loss" in rec:
            self._train()
            self.progress.update(self.task, completed=rec["step"], loss=f"{rec['loss']:.4f}",
                                 tps=f"{rec['tokens_per_s']:,.0f}")
            every = max(1, (self.total or 0) // 10)
            if not self.live and (rec["step"] % every == 0 or rec["step"] == 1):
                self.console.print(
                    f"  step {rec['step']}/{self.total or '?'}  loss {rec['loss']:.4f}  "
                    f"{rec['tokens_per_s']:,.0f} tok/s  {rec['elapsed_s']:.0f}s"
                )


def _read_phase(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@contextmanager
def training_progress(run_dir: Path, console: Console) -> Iterator[Display]:
    """A progress bar (phase, then step, loss, tokens/s) on a terminal; plain lines elsewhere.
    Yields the `Display`, whose `phase(text)` the driver calls as it goes."""
    tail = _Tail(run_dir / METRICS_FILE)
    phase_file = run_dir / PHASE_FILE
    stop = threading.Event()
    display = Display(console)

    def poll_once() -> None:
        phase = _read_phase(phase_file)
        if phase:
            display.phase(phase)
        for rec in tail.lines():
            display.record(rec)

    def poll() -> None:
        while not stop.is_set():
            poll_once()
            stop.wait(0.5)
        poll_once()

    thread = threading.Thread(target=poll, daemon=True)
    with display.progress:
        thread.start()
        try:
            yield display
        finally:
            stop.set()
            thread.join()
