"""Submission and tracking against a scripted scheduler (the `launcher.backends.exec` seam):
sbatch, squeue, sacct, scancel; the CLI verbs submit --dry-run, status, logs, cancel."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, tiny_recipe_dict
from launcher.backends import exec as sh
from launcher.cli.app import app
from launcher.errors import UserError

runner = CliRunner()
PROFILE = ROOT / "cluster/dev/local-slurm.yaml"


class FakeSlurm:
    """Answers scheduler commands from a table; records every call."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.squeue = ""  # "STATE|REASON"
        self.sacct: str | None = None  # None: accounting disabled

    def __call__(self, args, stdin, timeout):
        self.calls.append(args)
        name = args[0]
        if name == "sbatch":
            return sh.Result(args, 0, "4242\n", "")
        if name == "squeue":
            return sh.Result(args, 0, self.squeue + ("\n" if self.squeue else ""), "")
        if name == "sacct":
            if self.sacct is None:
                return sh.Result(args, 1, "", "Slurm accounting storage is disabled\n")
            return sh.Result(args, 0, self.sacct + "\n", "")
        if name == "scancel":
            return sh.Result(args, 0, "", "")
        raise AssertionError(f"unexpected command {args}")

    def called(self, name):
        return [c for c in self.calls if c[0] == name]


@pytest.fixture
def slurm(monkeypatch, tmp_path):
    fake = FakeSlurm()
    monkeypatch.setattr(sh, "RUNNER", fake)
    monkeypatch.setenv("LAUNCHER_STATE_DIR", str(tmp_path / "state"))
    return fake


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(name="tiny", resources={"cpu_workers": 2})))
    return path


def submit(recipe_file, run_dir, *extra):
    return runner.invoke(app, ["submit", str(recipe_file), "--cluster", str(PROFILE), "--run-dir", str(run_dir), *extra])


def test_dry_run_prints_script_and_estimate_and_submits_nothing(slurm, recipe_file, tmp_path):
    res = submit(recipe_file, tmp_path / "run", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "#SBATCH --signal=B:USR1@30" in res.output and "sbatch --parsable" in res.output
    assert "estimate" in res.output
    assert slurm.calls == [] and not (tmp_path / "run").exists()
    res = submit(recipe_file, tmp_path / "run", "--dry-run", "--json")
    data = json.loads(res.output)
    assert data["command"][0] == "sbatch" and data["script"].startswith("#!/bin/bash")


def test_submit_writes_run_dir_and_records_the_job(slurm, recipe_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FAKE_SECRET_0123456789")
    res = submit(recipe_file, tmp_path / "run", "--json", "train.max_steps=7")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["job_id"] == "4242"
    (cmd,) = slurm.called("sbatch")
    assert cmd[:2] == ["sbatch", "--parsable"] and cmd[-1] == str(tmp_path / "run" / "slurm" / "job.sbatch")
    assert "max_steps: 7" in (tmp_path / "run" / "slurm" / "recipe.yaml").read_text()
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert "hf_FAKE_SECRET" not in f.read_text()
    res = runner.invoke(app, ["status", out["run_id"], "--json"])
    run = json.loads(res.output)
    assert run["backend"] == "slurm" and run["job_ids"] == ["4242"] and run["status"] == "pending"
    # a second submit into the same directory is refused
    assert submit(recipe_file, tmp_path / "run").exit_code != 0


def _events(run_dir, *events):
    path = run_dir / "slurm" / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def test_status_follows_the_job_across_requeues(slurm, recipe_file, tmp_path):
    run_dir = tmp_path / "run"
    submit(recipe_file, run_dir)
    slurm.squeue = "RUNNING|None"
    _events(run_dir, {"event": "start", "restart": 0, "time": 100})
    res = runner.invoke(app, ["status", "--json"])
    (run,) = json.loads(res.output)
    assert run["status"] == "running" and run["started_at"] == 100
    # preempted: the job requeued itself and waits for its next allocation
    slurm.squeue = "PENDING|BeginTime"
    _events(run_dir, {"event": "start", "restart": 0, "time": 100}, {"event": "exit", "restart": 0, "time": 160, "code": 75},
            {"event": "requeue", "restart": 0, "time": 160})
    (run,) = json.loads(runner.invoke(app, ["status", "--json"]).output)
    assert run["status"] == "pending" and "requeued" in run["detail"]
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("step-00000010")
    _events(run_dir, {"event": "start", "restart": 0, "time": 100}, {"event": "exit", "restart": 0, "time": 160, "code": 75},
            {"event": "start", "restart": 1, "time": 200}, {"event": "exit", "restart": 1, "time": 260, "code": 0})
    slurm.squeue = ""  # Slurm forgot the job, accounting is disabled: the events tell
    res = runner.invoke(app, ["status", run["run_id"], "--json"])
    run = json.loads(res.output)
    assert run["status"] == "completed" and run["restarts"] == 1 and run["exit_code"] == 0
    assert run["latest_checkpoint"] == "step-00000010" and run["ended_at"] == 260
    assert [h["status"] for h in run["history"]] == ["pending", "running", "pending", "completed"]
    # the table
    res = runner.invoke(app, ["status"])
    assert res.exit_code == 0 and "completed" in res.output and "4242" in res.output and "step-00000010" in res.output


def test_status_uses_sacct_when_squeue_forgot(slurm, recipe_file, tmp_path):
    submit(recipe_file, tmp_path / "run")
    slurm.sacct = "FAILED"
    (run,) = json.loads(runner.invoke(app, ["status", "--json"]).output)
    assert run["status"] == "failed"


def test_gpu_hours_and_dollars(slurm, tmp_path):
    from launcher.backends.slurm.submit import refresh
    from launcher.runs import Registry, RunRecord

    reg = Registry()
    run_dir = tmp_path / "g"
    (run_dir / "slurm").mkdir(parents=True)
    reg.add(RunRecord(run_id="g", name="g", backend="slurm", run_dir=str(run_dir), job_ids=["1"], nodes=2,
                      gpus_per_node=8, usd_per_gpu_hour=2.0))
    _events(run_dir, {"event": "start", "restart": 0, "time": 0}, {"event": "exit", "restart": 0, "time": 1800, "code": 75},
            {"event": "start", "restart": 1, "time": 3600}, {"event": "exit", "restart": 1, "time": 5400, "code": 0})
    slurm.squeue = "COMPLETED|None"
    run = refresh(reg.get("g"), reg)
    assert run.gpu_hours == pytest.approx(16.0) and run.usd == pytest.approx(32.0)  # 1 h x 16 GPUs


def test_cancel_marks_the_run_dir_then_scancels(slurm, recipe_file, tmp_path):
    submit(recipe_file, tmp_path / "run")
    (run,) = json.loads(runner.invoke(app, ["status", "--json"]).output)
    res = runner.invoke(app, ["cancel", run["run_id"]])
    assert res.exit_code == 0, res.output
    assert slurm.called("scancel") == [["scancel", "4242"]]
    assert (tmp_path / "run" / "slurm" / "cancel-requested").exists()
    (run,) = json.loads(runner.invoke(app, ["status", "--json"]).output)
    assert run["status"] == "cancelled"
    res = runner.invoke(app, ["cancel", run["run_id"]])
    assert res.exit_code != 0


def test_logs_prints_the_job_output(slurm, recipe_file, tmp_path):
    submit(recipe_file, tmp_path / "run")
    (run,) = json.loads(runner.invoke(app, ["status", "--json"]).output)
    (tmp_path / "run" / "slurm" / "job.out").write_text("hello from the job\n")
    res = runner.invoke(app, ["logs", run["run_id"]])
    assert res.exit_code == 0 and "hello from the job" in res.output
    slurm.squeue = "COMPLETED|None"
    res = runner.invoke(app, ["logs", run["run_id"], "-f"])  # ends with the run
    assert res.exit_code == 0 and "hello from the job" in res.output


def test_submit_refuses_what_does_not_fit(slurm, recipe_file, tmp_path, monkeypatch):
    import launcher.estimate as est_mod

    class Est:
        fits = False

        def to_json(self):
            return {"fits": False}

    monkeypatch.setattr(est_mod, "estimate_recipe", lambda *a, **k: Est())
    monkeypatch.setattr(est_mod, "format_estimate", lambda e: "verdict  does not fit")
    res = submit(recipe_file, tmp_path / "run")
    # CliRunner bypasses launcher.cli.main, which turns a UserError into exit 2
    assert isinstance(res.exception, UserError) and res.exception.exit_code == 2
    assert "does not fit" in str(res.exception) and "verdict" in res.output
    assert slurm.called("sbatch") == []
    res = submit(recipe_file, tmp_path / "run", "--force")
    assert res.exit_code == 0 and len(slurm.called("sbatch")) == 1


def test_every_new_verb_has_help_with_an_example():
    for verb in ("submit", "status", "logs", "cancel"):
        res = runner.invoke(app, [verb, "--help"])
        assert res.exit_code == 0 and "Example: launcher" in res.output, verb


def test_sbatch_failure_is_a_user_error(slurm, recipe_file, tmp_path, monkeypatch):
    def failing(args, stdin, timeout):
        return sh.Result(args, 1, "", "sbatch: error: invalid partition specified: debug\n")

    monkeypatch.setattr(sh, "RUNNER", failing)
    res = submit(recipe_file, tmp_path / "run")
    assert res.exit_code != 0 and re.search("invalid partition", str(res.exception))


def test_dry_run_without_the_estimator(slurm, recipe_file, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "launcher.estimate", None)  # import fails
    res = submit(recipe_file, tmp_path / "run", "--dry-run")
    assert res.exit_code == 0 and "estimate: unavailable" in res.output
