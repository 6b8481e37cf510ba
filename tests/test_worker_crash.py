"""A worker that dies mid-run: Ray Train restarts the worker group, which resumes from the run's
own commits, whatever flags started the run (`--no-resume` included)."""

from __future__ import annotations

import json
import signal

import psutil
import pytest

from ckpt_harness import kill_tree, start, step_records, wait_for, write_recipe

pytestmark = pytest.mark.slow


def _train_workers(pid: int) -> list[psutil.Process]:
    out = []
    for q in psutil.Process(pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(q.cmdline()):
                out.append(q)
        except psutil.Error:
            pass
    return out


def test_a_crashed_worker_after_no_resume_resumes_from_the_runs_commits(tmp_path):
    recipe = write_recipe(tmp_path / "ckpt.yaml")
    run_dir = tmp_path / "run"
    log = tmp_path / "log"
    p = start(["run", str(recipe), "--run-dir", str(run_dir), "--no-resume", "train.max_steps=30"], log)
    try:
        # past the commit at step 5 (checkpoint.every_steps=5), then a worker dies
        assert wait_for(lambda: len(step_records(run_dir)) >= 8 or p.poll() is not None), log.read_text()[-3000:]
        assert p.poll() is None, log.read_text()[-3000:]
        workers = _train_workers(p.pid)
        assert workers, "no Ray Train worker found"
        workers[-1].send_signal(signal.SIGKILL)
        assert p.wait(600) == 0, log.read_text()[-3000:]
    finally:
        kill_tree(p)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumes = [r for r in lines if r.get("event") == "resume"]
    assert resumes and resumes[0]["step"] >= 5, [r.get("event") for r in lines]  # not from step 0
    steps = [r["step"] for r in step_records(run_dir)]
    assert steps == list(range(1, 31)), steps  # one continuous run: steps before the crash kept
