"""End to end on a real Slurm (the single-host one of cluster/dev/slurm-up.sh, which `make test`
starts): `launcher submit` of a tiny CPU recipe (2 Ray Train workers on the one node) runs to
completion; a preempted job checkpoints, requeues itself, resumes and finishes as one run.

Skipped only when Slurm's commands are absent and LAUNCHER_REQUIRE_SLURM is unset (`make test`
sets it, so CI cannot silently skip these)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_recipe_dict

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

DEV_CONF = Path(os.environ.get("LAUNCHER_SLURM_DIR", "/tmp/launcher-slurm")) / "slurm.conf"
SECRET = "hf_FAKE_TOKEN_do_not_leak_0123456789"


@pytest.fixture(scope="module")
def slurm_env():
    required = bool(os.environ.get("LAUNCHER_REQUIRE_SLURM"))
    if shutil.which("sinfo") is None and not required:
        pytest.skip("no Slurm here (sinfo not found); `make test` starts one with cluster/dev/slurm-up.sh")
    env = dict(os.environ)
    if "SLURM_CONF" not in env and DEV_CONF.exists():
        env["SLURM_CONF"] = str(DEV_CONF)
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, env=env)
        ok, why = res.returncode == 0 and bool(res.stdout.strip()), (res.stderr or res.stdout).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, str(e)
    if not ok:
        pytest.fail(f"Slurm is not answering ({why}): run `bash cluster/dev/slurm-up.sh` (make test does)")
    return env


@pytest.fixture
def cli(slurm_env, tmp_path, monkeypatch):
    env = {**slurm_env, "LAUNCHER_STATE_DIR": str(tmp_path / "state"), "HF_TOKEN": SECRET}
    for key in ("SLURM_CONF", "LAUNCHER_STATE_DIR"):  # polling happens in this process (cheaper)
        if key in env:
            monkeypatch.setenv(key, env[key])

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=120)
        if check:
            assert res.returncode == 0, res.stdout + res.stderr
        return res

    run.env = env
    return run


def _recipe(tmp_path: Path, steps: int) -> Path:
    data = tiny_recipe_dict(
        name="slurm-it",
        train={"max_steps": steps, "micro_batch_size": 4, "lr": 1e-3},
        resources={"cpu_workers": 2},
        checkpoint={"every_steps": 4},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _status(cli, run_id: str) -> dict:
    """What `launcher status RUN_ID --json` prints, asked in this process (a CLI process per poll
    costs a second of CPU on a 2-core machine)."""
    from launcher.backends.slurm.submit import refresh
    from launcher.runs import Registry

    reg = Registry()
    run = refresh(reg.find(run_id), reg)
    return {**run.to_json(), "history": reg.history(run.run_id)}


def _wait(cli, run_id: str, run_dir: Path, until, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = _status(cli, run_id)
        if until(st):
            return st
        if st["status"] in ("failed", "cancelled", "timeout"):
            break
        time.sleep(3)
    out = run_dir / "slurm" / "job.out"
    tail = out.read_text(errors="replace")[-4000:] if out.exists() else "(no job output)"
    pytest.fail(f"{what}: run is {st['status']} ({st.get('detail')})\n--- job.out ---\n{tail}")


def _steps(run_dir: Path) -> list[int]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [m["step"] for m in lines if "loss" in m and not m.get("eval")]


def _assert_no_secret(run_dir: Path, *texts: str) -> None:
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f"secret found in {f}"
    for t in texts:
        assert SECRET not in t


def test_submit_runs_to_completion(cli, tmp_path):
    run_dir = tmp_path / "run dir; $(touch PWNED)"
    t0 = time.monotonic()
    res = cli("submit", str(_recipe(tmp_path, 8)), "--cluster", "cluster/dev/local-slurm.yaml",
              "--run-dir", str(run_dir), "--json")
    sub = json.loads(res.stdout.strip().splitlines()[-1])
    assert sub["job_id"].isdigit()
    _wait(cli, sub["run_id"], run_dir, lambda s: s["status"] == "completed", 400, "the job did not complete")
    st = json.loads(cli("status", sub["run_id"], "--json").stdout)
    print(f"slurm job {sub['job_id']} completed in {time.monotonic() - t0:.0f}s")
    assert st["job_ids"] == [sub["job_id"]] and st["backend"] == "slurm" and st["restarts"] == 0
    assert st["exit_code"] == 0 and st["latest_checkpoint"] == "step-00000008"
    assert _steps(run_dir) == list(range(1, 9))
    assert (run_dir / "checkpoints" / "latest").exists() and (run_dir / "summary.json").exists()
    table = cli("status").stdout
    assert sub["run_id"] in table and "completed" in table and sub["job_id"] in table
    logs = cli("logs", sub["run_id"]).stdout
    assert "ray: 1/1 nodes joined" in logs
    _assert_no_secret(run_dir, logs, res.stdout, res.stderr)
    assert not list(tmp_path.rglob("PWNED")) and not (ROOT / "PWNED").exists()


def test_preempted_job_checkpoints_requeues_and_resumes(cli, tmp_path):
    run_dir = tmp_path / "preempt"
    t0 = time.monotonic()
    # Enough steps that the signal lands well before the end on a fast machine (10+ steps/s).
    steps = 80
    res = cli("submit", str(_recipe(tmp_path, steps)), "--cluster", "cluster/dev/local-slurm.yaml",
              "--run-dir", str(run_dir), "--json")
    sub = json.loads(res.stdout.strip().splitlines()[-1])
    deadline, polls = time.monotonic() + 400, 0
    while not (run_dir / "metrics.jsonl").exists() or len(_steps(run_dir)) < 5:
        assert time.monotonic() < deadline, "training did not start"
        if polls % 40 == 0:  # the job's state now and then; the metrics file often
            st = _status(cli, sub["run_id"])
            assert st["status"] in ("pending", "running"), st
        polls += 1
        time.sleep(0.05)
    # What Slurm does at `--signal=B:USR1@lead`, now: warn the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", sub["job_id"]], check=True, env=cli.env, timeout=30)
    _wait(cli, sub["run_id"], run_dir, lambda s: s["status"] == "completed", 500, "the preempted job did not finish")
    st = json.loads(cli("status", sub["run_id"], "--json").stdout)
    print(f"preempted slurm job {sub['job_id']} finished in {time.monotonic() - t0:.0f}s")
    events = [json.loads(x) for x in (run_dir / "slurm" / "events.jsonl").read_text().splitlines()]
    kinds = [(e["event"], e["restart"]) for e in events]
    assert ("signal", 0) in kinds and ("requeue", 0) in kinds and ("start", 1) in kinds
    assert [e["code"] for e in events if e["event"] == "exit"] == [75, 0]
    assert st["restarts"] == 1 and st["job_ids"] == [sub["job_id"]] and st["latest_checkpoint"] == f"step-{steps:08d}"
    # one continuous run: every step once, in order, and a resume from the committed checkpoint
    assert _steps(run_dir) == list(range(1, steps + 1))
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumes = [m for m in metrics if m.get("event") == "resume"]
    assert len(resumes) == 1 and 5 <= resumes[0]["step"] < steps
    history = [h["status"] for h in st["history"]]
    assert history[0] == "pending" and history[-1] == "completed" and "running" in history
    table = cli("status").stdout
    assert sub["run_id"] in table
    _assert_no_secret(run_dir, cli("logs", sub["run_id"]).stdout)
