"""The sbatch script: golden files for 1, 2 and 4 nodes; quoting of every recipe and profile
value, proved by running the rendered script under bash with stand-ins for Slurm and Python;
secrets never rendered."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, tiny_recipe_dict
from launcher.backends.profile import load_profile, profile_from_dict
from launcher.backends.slurm.render import render_sbatch
from launcher.errors import EXIT_PREEMPTED, RecipeError, UserError
from launcher.recipe import from_dict

FIXED = dict(run_id="demo-20250101-000000-abcd", python="/shared/venv/bin/python", workdir="/shared/project")


def golden_text(job) -> str:
    return "# sbatch " + shlex.join(job.sbatch_args) + " <script>\n" + job.script


def recipe(**resources):
    return from_dict(tiny_recipe_dict(name="demo", resources=resources))


def test_golden_local_one_node(golden):
    profile = load_profile(ROOT / "cluster/dev/local-slurm.yaml")
    job = render_sbatch(recipe(cpu_workers=2), profile, "/shared/runs/demo", **FIXED)
    golden("slurm/local-1node.sbatch", golden_text(job))


@pytest.mark.parametrize("nodes", [2, 4])
def test_golden_multi_node_gpus(golden, nodes):
    profile = load_profile(ROOT / "cluster/example-slurm.yaml")
    job = render_sbatch(recipe(nodes=nodes, gpus_per_node=8, gpu="H100-80GB"), profile, "/shared/runs/demo", **FIXED)
    assert f"#SBATCH --nodes={nodes}\n" in job.script
    assert "#SBATCH --gres=gpu:8\n" in job.script
    golden(f"slurm/example-{nodes}node.sbatch", golden_text(job))


def test_script_asks_for_preemption_handling():
    profile = load_profile(ROOT / "cluster/example-slurm.yaml")
    s = render_sbatch(recipe(nodes=2, gpus_per_node=8), profile, "/r", **FIXED).script
    assert "#SBATCH --signal=B:USR1@180\n" in s and "#SBATCH --requeue\n" in s
    assert "#SBATCH --ntasks-per-node=1\n" in s
    assert "trap 'forward USR1' USR1" in s and "trap 'forward TERM' TERM" in s
    assert f'if [ "$CODE" -eq {EXIT_PREEMPTED} ]' in s and 'scontrol requeue "$SLURM_JOB_ID"' in s
    assert "--include-dashboard=false" in s and "--node-ip-address" in s
    assert '-m launcher run "$RECIPE_YAML" --run-dir "$RUN_DIR" --ray-address "$RAY_ADDRESS_JOB" &' in s


def test_recipe_gpus_must_fit_the_nodes():
    profile = profile_from_dict({"backend": "slurm", "runs_root": "/r", "gpus_per_node": 4})
    with pytest.raises(UserError, match="asks for 8 GPUs per node"):
        render_sbatch(recipe(gpus_per_node=8), profile, "/r", **FIXED)


def test_recipe_name_cannot_carry_shell():
    for name in ("a;b", "$(id)", "`id`", "a\nb", "a b"):
        with pytest.raises(RecipeError, match="name"):
            from_dict(tiny_recipe_dict(name=name))


def test_directive_values_are_checked_again_at_render_time():
    profile = profile_from_dict({"backend": "slurm", "runs_root": "/r", "partition": "gpu"})
    object.__setattr__(profile, "partition", "gpu\n#SBATCH --wrap=id")  # bypasses validation
    with pytest.raises(UserError, match="cannot be written into an #SBATCH directive"):
        render_sbatch(recipe(), profile, "/r", **FIXED)


# --- the rendered script under bash, with stand-ins for srun, scontrol, squeue and Python ---

EVIL = ["; touch PWNED", "$(touch PWNED)", "`touch PWNED`", "x\ntouch PWNED\n", "' ; touch PWNED ; '", '" $(touch PWNED) "']

STUB = """#!/bin/bash
# records its name and arguments, NUL-separated, one record per call
{ printf '%s\\0' "$(basename "$0")" "$@"; printf '\\1\\0'; } >>"$STUB_LOG"
case "$(basename "$0"):$1" in
  scontrol:show) echo node1 ;;
  squeue:*) echo RUNNING ;;
  hostname:*) echo 10.1.2.3 ;;
  ip:*) echo "2: eth0    inet 10.1.2.3/24 brd 10.1.2.255 scope global eth0" ;;
esac
if [ "$1" = -m ] && [ "$2" = launcher ]; then exit "${STUB_DRIVER_CODE:-0}"; fi
if [ "$1" = -m ] && [ "$2" = launcher.backends.ports ]; then echo "$8"; fi   # the preferred block is free
exit 0
"""


def _stub_bin(tmp: Path, python_dir: Path) -> Path:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    python_dir.mkdir(parents=True)
    for path in [bin_dir / n for n in ("srun", "scontrol", "squeue", "hostname", "ip", "record")] + [python_dir / "python"]:
        path.write_text(STUB)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _calls(log: Path) -> list[list[str]]:
    return [rec.split("\0")[:-1] for rec in log.read_text().split("\x01\0") if rec]


@pytest.mark.parametrize("evil", EVIL, ids=range(len(EVIL)))
def test_values_with_shell_metacharacters_are_never_executed(tmp_path, evil):
    python_dir = tmp_path / f"py{evil}dir"
    bin_dir = _stub_bin(tmp_path, python_dir)
    run_dir = tmp_path / f"run{evil}dir"
    workdir = tmp_path / f"work{evil}dir"
    workdir.mkdir()
    (run_dir / "slurm").mkdir(parents=True)
    profile = profile_from_dict({
        "backend": "slurm",
        "runs_root": str(tmp_path),
        "setup": [f"record setup {shlex.quote(evil)}", f"record {evil}".replace("\n", " ")],
        "env": {"EVIL_VALUE": evil},
        "network_interface": f"eth0{evil}",
    })
    job = render_sbatch(
        recipe(cpu_workers=2), profile, str(run_dir), run_id="demo-1", python=str(python_dir / "python"),
        workdir=str(workdir),
    )
    script = run_dir / "slurm" / "job.sbatch"
    script.write_text(job.script)
    log = tmp_path / "calls.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_CPUS_PER_TASK": "2",
    }
    res = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert not list(tmp_path.rglob("PWNED")) and not list(Path.cwd().glob("PWNED")), "a value was executed"
    calls = _calls(log)
    # setup lines ran as one command each, their words literal
    assert ["record", "setup", evil] in calls
    # the driver got the run directory, byte for byte, and ran in the workdir
    driver = next(c for c in calls if c[1:4] == ["-m", "launcher", "run"])
    assert driver[0] == "python" and driver[4] == str(run_dir / "slurm" / "recipe.yaml")
    assert driver[5:7] == ["--run-dir", str(run_dir)] and driver[7:9] == ["--ray-address", "10.1.2.3:23400"]
    assert ["ip", "-4", "-o", "addr", "show", "dev", f"eth0{evil}"] in calls
    assert (run_dir / "slurm" / "events.jsonl").exists()


def _stubbed_job(tmp_path: Path, *, max_restarts: int, **extra_env: str) -> tuple[Path, Path, dict]:
    """A rendered job script in RUN_DIR/slurm/job.sbatch whose Slurm, Ray and driver commands are
    stubs that log their calls: (run_dir, call log, the job's environment on node1 of job 77)."""
    python_dir = tmp_path / "py"
    bin_dir = _stub_bin(tmp_path, python_dir)
    run_dir = tmp_path / "run"
    (run_dir / "slurm").mkdir(parents=True)
    profile = profile_from_dict({"backend": "slurm", "runs_root": str(tmp_path), "max_restarts": max_restarts})
    job = render_sbatch(recipe(), profile, str(run_dir), run_id="r", python=str(python_dir / "python"), workdir=str(tmp_path))
    (run_dir / "slurm" / "job.sbatch").write_text(job.script)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log), "SLURM_JOB_ID": "77",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1", **extra_env}
    return run_dir, log, env


def test_preempted_driver_requeues_the_job(tmp_path):
    run_dir, log, env = _stubbed_job(tmp_path, max_restarts=2, STUB_DRIVER_CODE=str(EXIT_PREEMPTED))

    def run(restart: int, cancel: bool = False) -> list[list[str]]:
        log.write_text("")
        (run_dir / "slurm" / "cancel-requested").unlink(missing_ok=True)
        if cancel:
            (run_dir / "slurm" / "cancel-requested").write_text("")
        res = subprocess.run(["bash", str(run_dir / "slurm" / "job.sbatch")], env={**env, "SLURM_RESTART_COUNT": str(restart)},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode in (0, EXIT_PREEMPTED), res.stderr
        return [c for c in _calls(log) if c[0] == "scontrol" and c[1] == "requeue"]

    assert run(0) == [["scontrol", "requeue", "77"]]
    assert run(2) == []  # max_restarts reached
    assert run(0, cancel=True) == []  # `launcher cancel` was asked for


def test_secrets_are_never_rendered(monkeypatch):
    secrets = {"HF_TOKEN": "hf_SECRETSECRET1", "WANDB_API_KEY": "wandbSECRET2", "AWS_SECRET_ACCESS_KEY": "awsSECRET3"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    for path in (ROOT / "cluster/example-slurm.yaml", ROOT / "cluster/dev/local-slurm.yaml"):
        job = render_sbatch(recipe(), load_profile(path), "/r", **FIXED)
        text = job.script + " ".join(job.sbatch_args)
        for k, v in secrets.items():
            assert v not in text and k not in text


def test_a_node_lost_twice_is_excluded_and_the_allocation_requeued(tmp_path):
    run_dir, log, env = _stubbed_job(tmp_path, max_restarts=5, SLURM_RESTART_COUNT="2")
    events = run_dir / "slurm" / "events.jsonl"

    def run(failures: int) -> list[list[str]]:
        lost = [{"event": "node_failed", "job_id": "77", "restart": i, "time": 1, "node": "node1"} for i in range(failures)]
        events.write_text("".join(json.dumps(e) + "\n" for e in lost))
        log.write_text("")
        res = subprocess.run(["bash", str(run_dir / "slurm" / "job.sbatch")], env=env, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        return _calls(log)

    calls = run(2)   # node1 (stub: every allocation is node1) was lost under two allocations
    assert ["scontrol", "requeue", "77"] in calls and ["scontrol", "update", "JobId=77", "ExcNodeList=node1"] in calls
    assert not [c for c in calls if c[1:3] == ["-m", "launcher"]], "the driver ran on a node to exclude"
    assert '"event": "exclude"' in events.read_text()
    calls = run(1)   # once is not yet "repeatedly"
    assert not [c for c in calls if c[0] == "scontrol" and c[1] in ("requeue", "update")]
    assert [c for c in calls if c[1:3] == ["-m", "launcher"]]
