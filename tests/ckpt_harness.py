"""Drive `launcher run` as users and schedulers do: start it, signal or SIGKILL it at a chosen
moment, resume it, and read its per-step losses. Shared by the checkpoint tests and
scripts/kill-test.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, "-m", "launcher"]

# Long enough that a signal sent after step ~22 lands well before the end on a fast machine
# (a stop lands a few steps late: 10+ steps/s here), short enough to stay within one epoch.
STEPS = 60
RECIPE = """\
defaults: [{root}/recipes/examples/tiny-sft.yaml]
name: ckpt-test
data:
  synthetic: {{task: reverse, num_examples: 800}}
train: {{max_steps: %d, micro_batch_size: 4, eval_every: 0}}
checkpoint: {{every_steps: 5, keep_last: 2}}
sample: {{from_eval: 0}}
logging: {{tensorboard: false, sample_ids: true}}
""" % STEPS


def write_recipe(path: Path) -> Path:
    path.write_text(RECIPE.format(root=ROOT))
    return path


def step_records(run_dir: Path) -> list[dict]:
    out = []
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in r and not r.get("eval"):
            out.append(r)
    return out


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in step_records(run_dir)]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        LAUNCHER + args, cwd=ROOT, stdout=open(log, "a"), stderr=subprocess.STDOUT,
        start_new_session=True, env=env,
    )


def run(args: list[str], log: Path, timeout: float = 600) -> int:
    p = start(args, log)
    try:
        return p.wait(timeout)
    finally:
        kill_tree(p)


def kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL the launcher and everything it started (Ray's GCS, raylet, workers)."""
    try:
        procs = [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for q in procs:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        pass


def wait_for(pred, timeout: float = 900, poll: float = 0.02) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(poll)
    return False


def saving_now(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.name.endswith(".tmp") for p in root.iterdir())


def background_save(run_dir: Path) -> int | None:
    """The step of a save being written while training has gone past it (a background save:
    a `step-N.tmp` directory and a logged step after N), or None."""
    root = run_dir / "checkpoints"
    try:
        tmps = [int(p.name[5:-4]) for p in root.iterdir() if p.name.startswith("step-") and p.name.endswith(".tmp")]
    except (OSError, ValueError):
        return None
    if not tmps:
        return None
    last = max((r["step"] for r in step_records(run_dir) if isinstance(r.get("step"), int)), default=0)
    return max(tmps) if last > max(tmps) else None


def interrupt(args: list[str], run_dir: Path, log: Path, *, after_step: int, how: str,
              before_kill: Callable[[], None] | None = None) -> int | None:
    """Start a run and, once `after_step` steps are logged, SIGTERM it (returns its exit code)
    or SIGKILL the whole tree (`how="kill"`, returns None); `how="kill-in-save"` waits from then
    on for the next save in progress and kills it in the middle; `how="kill-in-background-save"`
    for a save still being written while training has gone on past its step."""
    p = start(args, log)
    try:
        ok = wait_for(lambda: len(step_records(run_dir)) >= after_step or p.poll() is not None)
        assert ok and p.poll() is None, f"the run ended before step {after_step}; see {log}"
        if how == "term":
            p.send_signal(signal.SIGTERM)
            return p.wait(300)
        if how == "kill-in-save":
            assert wait_for(lambda: saving_now(run_dir) or p.poll() is not None), "no save began"
        if how == "kill-in-background-save":
            assert wait_for(lambda: background_save(run_dir) is not None or p.poll() is not None, timeout=300), \
                "no background save seen"
        if before_kill:
            before_kill()
        kill_tree(p)
        return None
    finally:
        kill_tree(p)
