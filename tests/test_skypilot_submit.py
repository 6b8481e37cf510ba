"""Launch, status, logs and cancel through the SDK seam, replaced by a recorder: managed jobs on
spot, `sky.launch` on demand, the rendered task handed over as rendered, secrets only as
secrets; the registry's job ids, recoveries and spend; `--dry-run` launches nothing."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, tiny_recipe_dict
from launcher.backends.profile import load_profile
from launcher.backends.skypilot import launch, sdk
from launcher.backends.skypilot.render import RAY_TOKEN_SECRET
from launcher.cli.app import app
from launcher.recipe import from_dict

runner = CliRunner()
SPOT = ROOT / "cluster/example-skypilot.yaml"
ONDEMAND = ROOT / "cluster/example-skypilot-gcp.yaml"
SECRET = "hf_FAKE_SECRET_0123456789"


class Recorder:
    """Stands in for SkyPilot: records every call, answers from its attributes."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.managed = {"status": "PENDING", "recovery_count": 0, "started_at": None, "ended_at": None,
                        "duration_s": None}
        self.cluster_job: dict | None = {"status": "PENDING", "started_at": None, "ended_at": None}

    def launch(self, config, secrets, *, cluster_name):
        self.calls.append(("launch", {"config": config, "secrets": dict(secrets), "cluster_name": cluster_name}))
        return "1"

    def jobs_launch(self, config, secrets, *, name):
        self.calls.append(("jobs_launch", {"config": config, "secrets": dict(secrets), "name": name}))
        return "7"

    def job_status(self, cluster_name, job_id):
        self.calls.append(("job_status", {"cluster_name": cluster_name, "job_id": job_id}))
        return self.cluster_job

    def managed_job_status(self, job_id):
        self.calls.append(("managed_job_status", {"job_id": job_id}))
        return self.managed

    def tail_logs(self, cluster_name, job_id, *, follow):
        self.calls.append(("tail_logs", {"cluster_name": cluster_name, "job_id": job_id, "follow": follow}))
        return 0

    def cancel(self, cluster_name, job_id):
        self.calls.append(("cancel", {"cluster_name": cluster_name, "job_id": job_id}))

    def jobs_cancel(self, job_id):
        self.calls.append(("jobs_cancel", {"job_id": job_id}))

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def sky(monkeypatch, tmp_path):
    rec = Recorder()
    monkeypatch.setattr(sdk, "CLIENT", rec)
    monkeypatch.setenv("LAUNCHER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("LAUNCHER_OFFLINE_PRICES", "1")   # the shipped price table, not SkyPilot's catalog
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    return rec


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    d = tiny_recipe_dict(name="tiny", resources={"nodes": 2, "gpus_per_node": 8, "gpu": "H100-80GB"})
    path.write_text(yaml.safe_dump(d))
    return path


def submit(recipe_file, profile, run_dir, *extra):
    return runner.invoke(app, ["submit", str(recipe_file), "--cluster", str(profile), "--run-dir", str(run_dir), *extra])


def test_dry_run_prints_task_and_estimate_and_launches_nothing(sky, recipe_file, tmp_path):
    res = submit(recipe_file, SPOT, tmp_path / "run", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "sky.jobs.launch" in res.output and "num_nodes: 2" in res.output and "use_spot: true" in res.output
    assert "secrets from your environment: HF_TOKEN, LAUNCHER_RAY_AUTH_TOKEN" in res.output
    assert "estimate" in res.output.lower() and SECRET not in res.output
    assert sky.calls == [] and not (tmp_path / "run").exists()
    data = json.loads(submit(recipe_file, SPOT, tmp_path / "run", "--dry-run", "--json").stdout)
    assert data["task"]["num_nodes"] == 2 and data["task"]["resources"]["use_spot"] is True
    # cost rows only for the profile's clouds (aws), from the shipped table
    clouds = {c["cloud"] for c in data["estimate"]["costs"]}
    assert clouds == {"AWS"}, clouds
    assert sky.calls == []


def test_spot_submits_a_managed_job_with_the_rendered_task(sky, recipe_file, tmp_path):
    res = submit(recipe_file, SPOT, tmp_path / "run", "--json", "train.max_steps=7")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["job_id"] == "7" and out["managed"] is True
    (call,) = [c for c in sky.calls if c[0] == "jobs_launch"]
    assert sky.names() == ["jobs_launch"] and call[1]["name"] == out["run_id"]
    # the task handed to SkyPilot is the one written to the run directory
    written = yaml.safe_load((tmp_path / "run" / "skypilot" / "task.yaml").read_text())
    assert call[1]["config"] == written
    assert written["num_nodes"] == 2 and written["resources"]["use_spot"] is True
    assert "max_steps: 7" in (tmp_path / "run" / "skypilot" / "recipe.yaml").read_text()
    # secrets: the value only in SkyPilot's secrets, plus a fresh Ray token
    secrets = call[1]["secrets"]
    assert secrets["HF_TOKEN"] == SECRET and len(secrets[RAY_TOKEN_SECRET]) == 64 and set(secrets) == {"HF_TOKEN", RAY_TOKEN_SECRET}
    assert SECRET not in json.dumps(call[1]["config"]) and "HF_TOKEN" not in call[1]["config"]["envs"]
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            text = f.read_text()
            assert SECRET not in text and secrets[RAY_TOKEN_SECRET] not in text
    # the registry
    run = json.loads(runner.invoke(app, ["status", out["run_id"], "--json"]).stdout)
    assert run["backend"] == "skypilot" and run["job_ids"] == ["managed:7"] and run["status"] == "pending"
    # price: AWS p5.48xlarge spot 30.326 $/h for 8 H100 in data/prices.csv -> 3.79075 $/GPU-h
    assert run["usd_per_gpu_hour"] == pytest.approx(30.326 / 8)
    assert SECRET not in json.dumps(run)
    # a second submit into the same directory is refused
    assert submit(recipe_file, SPOT, tmp_path / "run").exit_code != 0


def test_status_records_recoveries_and_spend(sky, recipe_file, tmp_path):
    out = json.loads(submit(recipe_file, SPOT, tmp_path / "run", "--json").stdout.strip().splitlines()[-1])
    sky.managed = {"status": "RUNNING", "recovery_count": 0, "started_at": 1000.0, "ended_at": None, "duration_s": 600.0}
    (run,) = json.loads(runner.invoke(app, ["status", "--json"]).stdout)
    assert run["status"] == "running" and run["restarts"] == 0 and run["started_at"] == 1000.0
    # preempted: SkyPilot is finding new instances
    sky.managed = {"status": "RECOVERING", "recovery_count": 1, "started_at": 1000.0, "ended_at": None, "duration_s": 1800.0}
    (run,) = json.loads(runner.invoke(app, ["status", "--json"]).stdout)
    assert run["status"] == "preempted" and run["restarts"] == 1 and "RECOVERING" in run["detail"]
    sky.managed = {"status": "SUCCEEDED", "recovery_count": 1, "started_at": 1000.0, "ended_at": 9000.0, "duration_s": 7200.0}
    run = json.loads(runner.invoke(app, ["status", out["run_id"], "--json"]).stdout)
    assert run["status"] == "completed" and run["restarts"] == 1 and run["ended_at"] == 9000.0
    # 2 h of running (SkyPilot's job_duration) x 2 nodes x 8 GPUs = 32 GPU-hours, at 30.326/8 $/GPU-h
    assert run["gpu_hours"] == pytest.approx(32.0) and run["usd"] == pytest.approx(32.0 * 30.326 / 8)
    assert [h["status"] for h in run["history"]] == ["pending", "running", "preempted", "completed"]
    assert all(c == ("managed_job_status", {"job_id": "7"}) for c in sky.calls[1:])
    # an ended run is not asked about again
    n = len(sky.calls)
    runner.invoke(app, ["status"])
    assert len(sky.calls) == n


def test_on_demand_uses_sky_launch_and_the_profiles_price(sky, recipe_file, tmp_path):
    out = json.loads(submit(recipe_file, ONDEMAND, tmp_path / "run", "--json").stdout.strip().splitlines()[-1])
    (call,) = sky.calls
    assert call[0] == "launch" and call[1]["cluster_name"] == out["cluster"] and out["cluster"].startswith("l-tiny-")
    assert call[1]["config"]["resources"]["use_spot"] is False and "job_recovery" not in call[1]["config"]["resources"]
    sky.cluster_job = {"status": "RUNNING", "started_at": 100.0, "ended_at": None}
    sky.cluster_job = {"status": "FAILED", "started_at": 100.0, "ended_at": 100.0 + 1800}
    run = json.loads(runner.invoke(app, ["status", out["run_id"], "--json"]).stdout)
    assert run["job_ids"] == [f"{out['cluster']}:1"] and run["status"] == "failed"
    assert run["gpu_hours"] == pytest.approx(0.5 * 16) and run["usd"] == pytest.approx(0.5 * 16 * 3.67)
    assert ("job_status", {"cluster_name": out["cluster"], "job_id": "1"}) in sky.calls


def test_cancel_and_logs_go_to_the_right_calls(sky, recipe_file, tmp_path):
    spot = json.loads(submit(recipe_file, SPOT, tmp_path / "a", "--json").stdout.strip().splitlines()[-1])
    ond = json.loads(submit(recipe_file, ONDEMAND, tmp_path / "b", "--json").stdout.strip().splitlines()[-1])
    assert runner.invoke(app, ["logs", spot["run_id"]]).exit_code == 0
    assert ("tail_logs", {"cluster_name": None, "job_id": "7", "follow": False}) in sky.calls
    assert runner.invoke(app, ["logs", ond["run_id"], "-f"]).exit_code == 0
    assert ("tail_logs", {"cluster_name": ond["cluster"], "job_id": "1", "follow": True}) in sky.calls
    res = runner.invoke(app, ["cancel", spot["run_id"]])
    assert res.exit_code == 0 and "cancelled" in res.output
    assert ("jobs_cancel", {"job_id": "7"}) in sky.calls
    assert runner.invoke(app, ["cancel", ond["run_id"]]).exit_code == 0
    assert ("cancel", {"cluster_name": ond["cluster"], "job_id": "1"}) in sky.calls
    run = json.loads(runner.invoke(app, ["status", spot["run_id"], "--json"]).stdout)
    assert run["status"] == "cancelled"
    assert runner.invoke(app, ["cancel", spot["run_id"]]).exit_code != 0   # already ended


def test_unset_secrets_are_left_out_and_the_launch_gets_the_plan(sky, tmp_path):
    profile = load_profile(SPOT)
    r = from_dict(tiny_recipe_dict(name="tiny", resources={"nodes": 1, "gpus_per_node": 8}))
    sub = launch.plan(r, profile, run_dir=tmp_path / "p", environ={"WANDB_API_KEY": "w"})
    assert sub.task.secret_names == ["WANDB_API_KEY", RAY_TOKEN_SECRET]
    assert launch.secret_values(sub, {"WANDB_API_KEY": "w"})["WANDB_API_KEY"] == "w"


def test_missing_skypilot_is_a_user_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_sky(name, *a, **k):
        if name == "sky" or name.startswith("sky."):
            raise ImportError("no sky")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_sky)
    from launcher.errors import UserError

    with pytest.raises(UserError, match=r"pip install 'skypilot\[aws\]'"):
        sdk.SkyPilotSDK().jobs_cancel("1")


def test_the_cli_does_not_import_skypilot():
    import subprocess
    import sys

    code = "import sys, launcher.cli.backend_cmds, launcher.backends.skypilot.launch; print('sky' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert out == "False"
