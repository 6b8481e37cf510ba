"""Live training progress in the driver's terminal, from the run's metrics.jsonl."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from launcher.runtime.metrics import METRICS_FILE


class _Tail:
    """Reads new complete lines of a growing file."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = ""

    def lines(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
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


@contextmanager
def training_progress(run_dir: Path, console: Console) -> Iterator[None]:
    """A progress bar (step, loss, tokens/s) on a terminal; periodic plain lines elsewhere."""
    tail = _Tail(run_dir / METRICS_FILE)
    stop = threading.Event()
    live = console.is_terminal
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not live,
    )
    task = progress.add_task("train", total=None, loss="-", tps="-")
    state = {"total": None, "printed": 0}

    def handle(rec: dict) -> None:
        if rec.get("event") == "start":
            state["total"] = rec["total_steps"]
            progress.update(task, total=rec["total_steps"])
            if not live:
                console.print(f"training: {rec['total_steps']} steps on {rec['world_size']} workers")
        elif rec.get("eval"):
            console.print(f"  step {rec['step']}: eval loss {rec['eval_loss']:.4f}")
        elif "loss" in rec:
            progress.update(task, completed=rec["step"], loss=f"{rec['loss']:.4f}", tps=f"{rec['tokens_per_s']:,.0f}")
            total = state["total"] or 0
            every = max(1, total // 10)
            if not live and (rec["step"] % every == 0 or rec["step"] == 1):
                console.print(
                    f"  step {rec['step']}/{total}  loss {rec['loss']:.4f}  "
                    f"{rec['tokens_per_s']:,.0f} tok/s  {rec['elapsed_s']:.0f}s"
                )

    def poll() -> None:
        while not stop.is_set():
            for rec in tail.lines():
                handle(rec)
            stop.wait(0.5)
        for rec in tail.lines():
            handle(rec)

    if not live:
        console.print("starting workers (Ray + DeepSpeed)...")
    thread = threading.Thread(target=poll, daemon=True)
    with progress:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
