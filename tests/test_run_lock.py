"""One run, one writer (issue 17 item 8): a run directory is held while its run lives, a second
`launcher run` on it is refused with exit 2 naming the holder, and nothing of a run's private Ray
cluster outlives its driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ckpt_harness import LAUNCHER, ROOT, kill_tree, start, step_records, wait_for, write_recipe
from launcher.errors import UserError
from launcher.runtime import reaper, run_lock


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    with run_lock.hold_run(run_dir, "launcher run"):
        with pytest.raises(UserError) as e:
            with run_lock.hold_run(run_dir, "launcher resume"):
                pass
        assert str(run_dir) in str(e.value) and f"pid {os.getpid()}" in str(e.value)
        assert e.value.exit_code == 2
    with run_lock.hold_run(run_dir, "launcher run"):  # released at the end of the first
        pass


def test_the_lock_follows_the_name_not_the_directory(tmp_path):
    """--no-resume renames the run directory aside: the lock must still guard the name."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert run_lock.lock_path(run_dir).parent == tmp_path
    with run_lock.hold_run(run_dir, "launcher run"):
        run_dir.rename(tmp_path / "run.old")
        with pytest.raises(UserError):
            with run_lock.hold_run(tmp_path / "run", "launcher run"):
                pass


def test_a_dead_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from launcher.runtime.run_lock import hold_run\n"
            f"with hold_run(Path({str(run_dir)!r}), 'x'):\n    print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(UserError):
            with run_lock.hold_run(run_dir, "launcher run"):
                pass
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        with run_lock.hold_run(run_dir, "launcher run"):
            pass
    finally:
        p.kill()


def test_a_live_worker_of_a_dead_driver_holds_the_run(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    code = ("import time; from pathlib import Path; from launcher.runtime.run_lock import hold_as_worker\n"
            f"hold_as_worker(Path({str(run_dir)!r})); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    monkeypatch.setattr(run_lock, "WORKERS_GONE_WAIT_S", 0.5)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="workers of an earlier run are still alive"):
            with run_lock.hold_run(run_dir, "launcher run"):
                pass
    finally:
        p.kill()
        p.wait(10)
    with run_lock.hold_run(run_dir, "launcher run"):
        pass


def test_the_reaper_kills_what_its_driver_left(tmp_path):
    """A driver that dies leaves its children running; the reaper it started kills them."""
    code = ("import subprocess, sys, time; from launcher.runtime import reaper\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
            "r = reaper.start(); print(child.pid, flush=True); time.sleep(120)")
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = psutil.Process(int(driver.stdout.readline()))
    time.sleep(2 * reaper.INTERVAL_S + 0.5)  # the reaper has noted the child
    driver.kill()
    driver.wait(10)
    gone, alive = psutil.wait_procs([child], timeout=15)
    for p in alive:
        p.kill()
    assert not alive, "the driver's child outlived it"


@pytest.mark.slow
def test_second_run_refused_and_a_killed_driver_leaves_nothing(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    run_dir, log = tmp_path / "run", tmp_path / "log"
    p = start(["run", str(recipe), "--run-dir", str(run_dir), "train.max_steps=400"], log)
    try:
        assert wait_for(lambda: len(step_records(run_dir)) >= 3 or p.poll() is not None, 600), log.read_text()[-3000:]
        second = subprocess.run(LAUNCHER + ["run", str(recipe), "--run-dir", str(run_dir)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "in use by launcher run" in second.stderr and f"pid {p.pid}" in second.stderr
        tree = psutil.Process(p.pid).children(recursive=True)
        assert any("RayTrainWorker" in " ".join(q.cmdline()) for q in tree)
        os.kill(p.pid, signal.SIGKILL)  # the driver alone, as the OOM killer does
        p.wait(10)
        killed_at = time.time()
        gone, alive = psutil.wait_procs([q for q in tree if q.is_running()], timeout=20)
        left = [" ".join(q.cmdline())[:120] for q in alive]
        assert not left, f"outlived their driver: {left}"
        commits = sorted((run_dir / "checkpoints").glob("step-*[0-9]"))
        late = [c.name for c in commits if c.stat().st_mtime > killed_at + 0.2]
        assert not late, f"committed after the driver died: {late}"
    finally:
        kill_tree(p)
