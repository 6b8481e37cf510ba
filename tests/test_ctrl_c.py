"""Ctrl-C as a person presses it: `launcher run` in a pseudo-terminal, and the '\\x03' byte
written to the terminal, so that the kernel sends SIGINT to the whole foreground process group
(the driver and every Ray process it started), as a real terminal does. The run must commit a
checkpoint and exit 75, and its resume must give the uninterrupted run's losses."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import tiny_recipe_dict
from ckpt_harness import LAUNCHER, ROOT, STEPS, kill_tree, losses, run, step_records, wait_for, write_recipe
from launcher.checkpoint.layout import latest_committed
from launcher.checkpoint.preempt import PREEMPTED_FILE, WorkerSignals, read_stop, request_stop
from launcher.recipe.load import from_dict
from launcher.runtime.driver import StopNow, forward_stop_signals
from launcher.errors import EXIT_PREEMPTED

# No periodic checkpoint: the one committed checkpoint is the one Ctrl-C asked for.
NO_PERIODIC = ["checkpoint.every_steps=1000"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class Terminal:
    """A command running as the session leader of a new pseudo-terminal, its controlling tty."""

    def __init__(self, args: list[str], cols: int = 120) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols), "PYTHONUNBUFFERED": "1"}
        env.pop("NO_COLOR", None)

        def take_terminal() -> None:  # runs in the child after setsid(): make the pty its terminal
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            LAUNCHER + args, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
            start_new_session=True, preexec_fn=take_terminal, env=env,
        )
        os.close(slave)
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:  # keep draining, or a full pty buffer would block the command
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every process holding the terminal has exited
                return
            if not data:
                return
            self._chunks.append(data)

    @property
    def text(self) -> str:
        return ANSI.sub("", b"".join(self._chunks).decode(errors="replace"))

    def press_ctrl_c(self) -> None:
        os.write(self.master, b"\x03")  # the line discipline turns it into SIGINT to the foreground group

    def session(self) -> list[psutil.Process]:
        """Processes still in the command's session (Ray's own keep it: they only change group)."""
        out = []
        for q in psutil.process_iter():
            try:
                if os.getsid(q.pid) == self.proc.pid:
                    out.append(q)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        return out

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            kill_tree(self.proc)
            self.close()

    def close(self) -> None:
        for q in self.session():
            try:
                q.kill()
            except psutil.Error:
                pass
        self._reader.join(10)
        os.close(self.master)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("recipe") / "ckpt.yaml")


@pytest.fixture(scope="module")
def baseline(recipe, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("base") / "run"
    assert run(["run", str(recipe), "--run-dir", str(run_dir), *NO_PERIODIC], run_dir.parent / "log") == 0
    assert [r["step"] for r in step_records(run_dir)] == list(range(1, STEPS + 1))
    return run_dir


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_commits_exits_75_and_resumes_identically(recipe, baseline, tmp_path):
    run_dir = tmp_path / "run"
    term = Terminal(["run", str(recipe), "--run-dir", str(run_dir), *NO_PERIODIC])
    ok = wait_for(lambda: len(step_records(run_dir)) >= 5 or term.proc.poll() is not None, timeout=600)
    assert ok and term.proc.poll() is None, term.text[-3000:]
    term.press_ctrl_c()
    rc = term.wait(300)
    out = term.text
    print(out[:2000])  # what the terminal showed, for -s
    assert rc == EXIT_PREEMPTED, out[-3000:]
    assert "SIGINT: checkpointing and stopping after this step" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    stopped = json.loads((run_dir / "preempted.json").read_text())
    assert stopped["signal"] == "SIGINT"
    assert stopped["committed"] == f"step-{stopped['step']:08d}"
    assert latest_committed(run_dir).step == stopped["step"] >= 5
    assert f"preempted after step {stopped['step']}: checkpoint step-{stopped['step']:08d} committed" in out
    # the terminal said what was happening before the first step
    first = re.search(rf"\b[1-9][0-9]*/{STEPS}\b", out)  # the bar may skip a step between refreshes
    assert first, out[-3000:]
    first_step = first.start()
    for phase in ("starting Ray", "starting 2 workers", "building the model"):
        assert -1 < out.find(phase) < first_step, (phase, out[:3000])

    assert run(["resume", str(run_dir)], tmp_path / "log") == 0, (tmp_path / "log").read_text()[-3000:]
    assert losses(run_dir) == losses(baseline)


@pytest.mark.slow
def test_rank_logs_hold_the_training_lines_not_library_warnings(baseline):
    for log in sorted((baseline / "logs").glob("rank-*.log")):
        text = log.read_text()
        assert "Warning" not in text, f"{log.name}:\n" + text[:3000]
    text = (baseline / "logs" / "rank-0.log").read_text()
    assert "launcher: rank 0 of 2" in text, text[:3000]
    assert text.count("launcher: done") == 1, text[-3000:]  # once: not also through Ray Train's logger


@pytest.mark.slow
def test_ctrl_c_twice_while_the_workers_start_stops_at_once_and_leaves_nothing(recipe, tmp_path):
    # Pressed while the workers start, the first Ctrl-C cannot be acted on for a while (no step
    # to finish yet), so the second one reliably lands before any checkpoint.
    run_dir = tmp_path / "run"
    term = Terminal(["run", str(recipe), "--run-dir", str(run_dir), *NO_PERIODIC])
    try:
        assert wait_for(lambda: "starting 2 workers" in term.text or term.proc.poll() is not None, 600)
        assert term.proc.poll() is None, term.text[-3000:]
        term.press_ctrl_c()
        assert wait_for(lambda: "checkpointing and stopping" in term.text, timeout=60), term.text[-3000:]
        term.press_ctrl_c()
        pressed = time.monotonic()
        rc = term.proc.wait(120)
        print(f"exit {time.monotonic() - pressed:.1f}s after the second Ctrl-C")
        assert rc == EXIT_PREEMPTED, term.text[-3000:]
        assert "second SIGINT: stopping at once, without committing a checkpoint" in term.text
        assert "nothing was committed by this stop" in " ".join(term.text.split())  # not "no time to save"
        stopped = json.loads((run_dir / "preempted.json").read_text())
        assert stopped["signal"] == "SIGINT" and stopped["aborted"] and stopped["committed"] is None
        assert "Traceback" not in term.text, term.text[-3000:]
        # Ray's processes (GCS, raylet, workers) went with it
        assert wait_for(lambda: not term.session(), timeout=60), [q.name() for q in term.session()]
    finally:
        kill_tree(term.proc)
        term.close()


def test_a_second_ctrl_c_stops_at_once_and_says_so(tmp_path, capsys):
    # The driver's handler, in this process: a full run cannot time a second press reliably
    # (the first one's checkpoint may already be committed when it lands).
    recipe = from_dict(tiny_recipe_dict())
    before = signal.getsignal(signal.SIGINT)
    with forward_stop_signals(tmp_path, recipe):
        os.kill(os.getpid(), signal.SIGINT)
        stop = read_stop(tmp_path)
        assert stop["signal"] == "SIGINT" and not stop.get("abort")
        assert "SIGINT: checkpointing and stopping after this step" in capsys.readouterr().err
        with pytest.raises(StopNow):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises before this ends
    assert "second SIGINT: stopping at once, without committing a checkpoint" in capsys.readouterr().err
    assert read_stop(tmp_path)["abort"] is True  # a save in progress on the workers is not committed
    stopped = json.loads((tmp_path / PREEMPTED_FILE).read_text())
    assert stopped["signal"] == "SIGINT" and stopped["committed"] is None and stopped["aborted"] is True
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_preempted_names_the_signal_of_the_drivers_stop_request(tmp_path):
    # under Ray Train the loop runs off the main thread: no handler of its own, only the stop file
    box = {}
    thread = threading.Thread(target=lambda: box.update(s=WorkerSignals(60.0)))
    thread.start()
    thread.join()
    assert box["s"].stop_signal(tmp_path) is None
    request_stop(tmp_path, signal.SIGINT, 60.0)
    assert box["s"].stop_signal(tmp_path) == "SIGINT"
