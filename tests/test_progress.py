"""The driver's progress display, without training: phases before the first step (in the bar on a
terminal, as plain lines elsewhere), then steps, fed from a run directory written by hand."""

from __future__ import annotations

import io
import json
import os
import time

from rich.console import Console

from launcher.cli.progress import Display, _Tail, training_progress
from launcher.runtime.driver import PHASE_FILE, write_phase

def start(at: float | None = None) -> dict:
    return {"event": "start", "total_steps": 20, "world_size": 2, "train_examples": 80, "eval_examples": 0,
            "params": 1000, "params_on_rank0": 500, "time": time.time() if at is None else at}


def step(n: int, at: float | None = None) -> dict:
    return {"step": n, "loss": 2.0 / n, "lr": 1e-3, "grad_norm": 1.0, "tokens": 64 * n, "step_tokens": 64,
            "tokens_per_s": 640.0, "step_time_s": 0.1, "elapsed_s": 0.1 * n,
            "time": time.time() if at is None else at}


def append(path, *recs) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)


def wait_until(pred, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_terminal_bar_names_each_phase_then_trains(tmp_path):
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with training_progress(tmp_path, console) as display:
        task = display.progress.tasks[0]
        assert task.description == "starting"
        display.phase("starting Ray")
        assert task.description == "starting Ray"
        display.phase("starting 2 workers")
        assert task.description == "starting 2 workers"
        write_phase(tmp_path, "building the model [and] the engine")  # written by rank 0; not markup
        assert wait_until(lambda: "building the model" in task.description), task.description
        append(tmp_path / "metrics.jsonl", start(), step(1), step(2))
        assert wait_until(lambda: task.completed == 2), task.completed
        assert task.description == "train" and task.total == 20 and task.fields["loss"] == "1.0000"
        display.phase("late phase")  # after the first step the bar stays on training
        assert task.description == "train"
    out = console.file.getvalue()
    assert "starting Ray" in out and "building the model [and] the engine" in out


def test_plain_output_prints_each_phase_once_before_the_steps(tmp_path):
    console = Console(file=io.StringIO(), force_terminal=False, width=120)
    with training_progress(tmp_path, console) as display:
        display.phase("starting Ray")
        display.phase("starting Ray")
        display.phase("starting 2 workers")
        write_phase(tmp_path, "building the model")
        assert wait_until(lambda: "building the model" in console.file.getvalue())
        append(tmp_path / "metrics.jsonl", start(), *[step(n) for n in range(1, 5)])
    lines = console.file.getvalue().splitlines()
    assert lines[:3] == ["starting Ray", "starting 2 workers", "building the model"], lines
    assert lines[3] == "training: 20 steps on 2 workers"
    assert lines[4].split() == ["step", "1/20", "loss", "2.0000", "640", "tok/s", "0s"]
    assert lines.count("starting Ray") == 1


def test_tail_reads_a_replaced_metrics_file_from_its_start(tmp_path):
    # a resume rewrites metrics.jsonl shorter (cut at the checkpoint's step) under the reader
    path = tmp_path / "metrics.jsonl"
    append(path, start(), *[step(n) for n in range(1, 9)])
    tail = _Tail(path)
    assert [r.get("step") for r in tail.lines()] == [None, *range(1, 9)]
    tmp = tmp_path / "m.tmp"
    append(tmp, start(), step(1), step(2))
    os.replace(tmp, path)
    append(path, step(3))
    assert [r.get("step") for r in tail.lines()] == [None, 1, 2, 3]
    append(path, step(4))
    assert [r.get("step") for r in tail.lines()] == [4]


def test_a_resumed_runs_old_lines_set_the_position_and_keep_the_phases_showing(tmp_path):
    # rank 0 keeps the lines up to the checkpoint and appends a resume event and the new steps
    console = Console(file=io.StringIO(), force_terminal=False, width=120)
    old = time.time() - 600
    append(tmp_path / "metrics.jsonl", start(old), *[step(n, old) for n in range(1, 11)],
           {"step": 10, "eval": True, "eval_loss": 1.5})
    with training_progress(tmp_path, console) as display:
        assert wait_until(lambda: display.progress.tasks[0].completed == 10)
        display.phase("starting Ray")  # the old lines did not end the phases
        append(tmp_path / "metrics.jsonl",
               {"event": "resume", "step": 10, "checkpoint": "step-00000010", "world_size": 2,
                "time": time.time()},
               step(11), step(12))
        assert wait_until(lambda: display.progress.tasks[0].completed == 12)
    lines = console.file.getvalue().splitlines()
    assert lines[:2] == ["starting Ray", "resumed at step 10 on 2 workers"], lines
    assert lines[2].split()[:2] == ["step", "12/20"] and len(lines) == 3, lines  # nothing old again


def test_display_without_terminal_counts_steps_of_a_resumed_run(tmp_path):
    console = Console(file=io.StringIO(), force_terminal=False, width=120)
    display = Display(console)
    display.record(start())
    display.record({"event": "resume", "step": 10, "checkpoint": "step-00000010", "world_size": 2,
                    "time": time.time()})
    display.record(step(11))
    assert "resumed at step 10 on 2 workers" in console.file.getvalue()
    assert display.progress.tasks[0].completed == 11


def test_a_resume_that_moves_the_end_shows_the_new_total(tmp_path):
    """`launcher resume RUN train.max_steps=30` of a 20-step run: the bar went on showing /20."""
    console = Console(file=io.StringIO(), force_terminal=False, width=120)
    display = Display(console)
    display.record(start(time.time() - 600))
    display.record({"event": "resume", "step": 10, "checkpoint": "step-00000010", "world_size": 2,
                    "total_steps": 30, "time": time.time()})
    display.record(step(11))
    assert display.progress.tasks[0].total == 30 and display.total == 30
