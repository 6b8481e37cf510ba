"""The SkyPilot task: golden files for 1 and 4 nodes, spot and on-demand; SkyPilot's own parser
accepts each; the `setup` and `run` scripts executed under bash with stand-ins for Python, Ray and
pip, to prove quoting (nothing from a profile or recipe is executed), Ray's ports and addresses,
the preemption window per cloud and the exit codes; secrets only as names."""

from __future__ import annotations

import copy
import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, tiny_recipe_dict
from launcher.backends.profile import load_profile, profile_from_dict
from launcher.backends.skypilot.render import RAY_TOKEN_SECRET, cluster_name, render_task
from launcher.errors import EXIT_PREEMPTED, UserError
from launcher.recipe import from_dict

RUN_ID = "demo-20260101-000000-abcd"
FIXED = dict(run_id=RUN_ID, workdir="/home/me/project", recipe_file="/home/me/project/runs/demo/skypilot/recipe.yaml")
CASES = {  # golden name: (profile, nodes)
    "spot-1node": ("cluster/example-skypilot.yaml", 1),
    "spot-4node": ("cluster/example-skypilot.yaml", 4),
    "ondemand-1node": ("cluster/example-skypilot-gcp.yaml", 1),
    "ondemand-4node": ("cluster/example-skypilot-gcp.yaml", 4),
}


def recipe(nodes=1, gpus=8, name="demo"):
    return from_dict(tiny_recipe_dict(name=name, resources={"nodes": nodes, "gpus_per_node": gpus, "gpu": "H100-80GB"}))


def task_for(case):
    path, nodes = CASES[case]
    return render_task(recipe(nodes), load_profile(ROOT / path), **FIXED)


@pytest.mark.parametrize("case", list(CASES))
def test_golden(golden, case):
    golden(f"skypilot/{case}.yaml", task_for(case).yaml)


@pytest.mark.parametrize("case", list(CASES))
def test_rendered_fields(case):
    path, nodes = CASES[case]
    t = task_for(case).config
    spot = case.startswith("spot")
    assert t["num_nodes"] == nodes and t["resources"]["use_spot"] is spot
    assert ("job_recovery" in t["resources"]) is spot
    if spot:
        assert t["resources"]["job_recovery"]["recover_on_exit_codes"] == [EXIT_PREEMPTED]
    mount = t["file_mounts"][f"~/launcher-runs/{RUN_ID}/checkpoints"]
    assert mount["source"].endswith(f"/launcher/{RUN_ID}") and mount["mode"] in ("MOUNT_CACHED", "MOUNT")
    assert t["secrets"] == {"HF_TOKEN": None, "WANDB_API_KEY": None, RAY_TOKEN_SECRET: None}


@pytest.mark.parametrize("case", list(CASES))
def test_skypilots_own_parser_accepts_the_task(case):
    if os.environ.get("LAUNCHER_REQUIRE_SKYPILOT"):
        import sky  # make test: a missing SkyPilot in .venv-sky is a failure, not a skip
    else:
        sky = pytest.importorskip("sky", reason="SkyPilot is not in this venv; `make test` runs this in .venv-sky")
    path, nodes = CASES[case]
    profile = load_profile(ROOT / path)
    task = sky.Task.from_yaml_config(
        copy.deepcopy(task_for(case).config),
        secrets_overrides=[("HF_TOKEN", "x"), ("WANDB_API_KEY", "y"), (RAY_TOKEN_SECRET, "z")],
    )
    assert task.num_nodes == nodes
    resources = list(task.resources)
    assert len(resources) == len(profile.infra())
    for r in resources:
        assert r.use_spot is profile.use_spot
        assert r.accelerators == {profile.accelerator: profile.gpus_per_node}
        assert str(r.cloud).lower() == profile.clouds[0] and r.region in profile.regions[profile.clouds[0]]
    ckpt = task.storage_mounts[f"~/launcher-runs/{RUN_ID}/checkpoints"]
    assert ckpt.source == f"{profile.checkpoint_bucket}/{RUN_ID}"
    assert ckpt.mode.value == profile.checkpoint_mount_mode
    assert task.file_mounts == {f"~/launcher-runs/{RUN_ID}/skypilot/recipe.yaml": FIXED["recipe_file"]}
    assert set(task.secrets) == {"HF_TOKEN", "WANDB_API_KEY", RAY_TOKEN_SECRET}
    assert "HF_TOKEN" not in task.envs and task.envs["LAUNCHER_BACKEND"] == "skypilot"


def test_recipe_must_fit_the_profile():
    profile = load_profile(ROOT / "cluster/example-skypilot.yaml")
    with pytest.raises(UserError, match="asks for 16 GPUs per node"):
        render_task(recipe(gpus=16), profile, **FIXED)
    with pytest.raises(UserError, match="resources.gpus_per_node=8"):
        render_task(from_dict(tiny_recipe_dict(name="demo")), profile, **FIXED)


def test_cluster_name_is_what_skypilot_allows():
    assert cluster_name("Llama_3.1-SFT-20260101-000000-ab12") == "l-llama-3-1-sft-20260101-000000-ab12"
    assert len(cluster_name("x" * 200)) <= 60


# --- the scripts under bash, with stand-ins ---

EVIL = ["; touch PWNED", "$(touch PWNED)", "`touch PWNED`", "x\ntouch PWNED\n", "' ; touch PWNED ; '", '" $(touch PWNED) "']

STUB = """#!/bin/bash
# records its name and arguments (and two variables), NUL-separated, one record per call
# (under a lock: the head runs in the background and two records must not interleave)
{ flock 9; { printf '%s\\0' "$(basename "$0")" "$@" "WINDOW=${LAUNCHER_PREEMPT_WINDOW_S:-}" "TOKEN=${RAY_AUTH_TOKEN:-}"; printf '\\1\\0'; } >>"$STUB_LOG"; } 9>>"$STUB_LOG.lock"
if [ "$1" = -c ]; then   # inline Python: the cloud probe runs for real; the port probe succeeds
  case "$2" in *create_connection*) exit 0 ;; *) exec python3 "$@" ;; esac
fi
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; cp "$0" "$3/bin/pip"; exit 0
fi
if [ "$1" = -m ] && [ "$2" = launcher.backends.slurm.wait_ray ]; then
  # like the real one, return once the head (started in the background) is up: it has recorded
  for _ in $(seq 100); do grep -aq -- --head "$STUB_LOG" && break; sleep 0.1; done
fi
if [ "$1" = -m ] && [ "$2" = launcher ]; then exit "${STUB_DRIVER_CODE:-0}"; fi
if [ "$1" = -m ] && [ "$2" = launcher.backends.ports ]; then echo "$8"; fi   # the preferred block is free
exit 0
"""


def _stub(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STUB)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [rec.split("\0")[:-1] for rec in log.read_text().split("\x01\0") if rec]


def _bash(script: str, tmp: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    path = tmp / f"script-{len(list(tmp.glob('script-*')))}.sh"
    path.write_text(script)
    return subprocess.run(["bash", str(path)], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("evil", EVIL, ids=range(len(EVIL)))
def test_setup_values_with_shell_metacharacters_are_never_executed(tmp_path, evil):
    home = tmp_path / "home"
    python = _stub(tmp_path / f"py{evil}dir".replace("\n", " ") / "python3")   # the profile refuses newlines there
    record = _stub(tmp_path / "bin" / "record")
    work = tmp_path / "work"
    work.mkdir()
    (work / "requirements-lock.txt").write_text("torch==2.13.0\nray==2.60.0\n")
    profile = profile_from_dict({
        "backend": "skypilot", "accelerators": "H100:8", "checkpoint_bucket": "s3://ckpt-bucket/x",
        "python": str(python),
        "setup": [f"record setup {__import__('shlex').quote(evil)}", f"record {evil}".replace("\n", " ")],
        "env": {"EVIL_VALUE": evil},
    })
    task = render_task(recipe(), profile, **FIXED)
    log = tmp_path / "calls.log"
    res = _bash(task.config["setup"], tmp_path, {"HOME": str(home), "STUB_LOG": str(log),
                                                  "PATH": f"{record.parent}:{os.environ['PATH']}"}, work)
    assert res.returncode == 0, res.stderr
    assert not list(tmp_path.rglob("PWNED")) and not list(Path.cwd().glob("PWNED")), "a value was executed"
    calls = _calls(log)
    assert ["record", "setup", evil] == calls[0][:3]
    assert [c[1:4] for c in calls if c[0] == "python3"] == [["-m", "venv", str(home / ".launcher-venv")]]
    pips = [c[1:] for c in calls if c[0] == "pip"]
    assert pips[1][:3] == ["install", "-q", "torch==2.13.0"]          # pinned torch first
    assert pips[2][:6] == ["install", "-q", "-c", "requirements-lock.txt", "-e", "."]
    # env values go to SkyPilot's envs (it exports them), never into a script
    assert task.config["envs"]["EVIL_VALUE"] == evil and evil not in task.config["run"] + task.config["setup"].split("record", 1)[0]


def _run_env(tmp_path, rank, ips, cloud="AWS", **extra):
    home = tmp_path / "home"
    venv_python = _stub(home / ".launcher-venv" / "bin" / "python")
    return home, venv_python, {
        "HOME": str(home), "STUB_LOG": str(tmp_path / "calls.log"), "SKYPILOT_NODE_RANK": str(rank),
        "SKYPILOT_NODE_IPS": ips, "SKYPILOT_NUM_NODES": str(len(ips.split())),
        "SKYPILOT_CLUSTER_INFO": f'{{"cluster_name": "c", "cloud": "{cloud}", "region": "r", "zone": null}}',
        RAY_TOKEN_SECRET: "tok123", **extra,
    }


@pytest.mark.parametrize("cloud, window", [("AWS", "120"), ("GCP", "30"), ("Azure", "30"), ("Lambda", "30")])
def test_rank_0_starts_the_head_waits_and_runs_the_driver(tmp_path, cloud, window):
    task = render_task(recipe(nodes=2), load_profile(ROOT / "cluster/example-skypilot.yaml"), **FIXED)
    home, _, env = _run_env(tmp_path, 0, "10.0.0.1\n10.0.0.2\n", cloud)
    res = _bash(task.config["run"], tmp_path, env, tmp_path)
    assert res.returncode == 0, res.stderr
    calls = [c for c in _calls(tmp_path / "calls.log") if c[1] == "-m"]
    (ports,) = [c for c in calls if c[2] == "launcher.backends.ports"]
    assert ports[3] == "10.0.0.1" and ports[6:8] == ["20000", "31999"]   # this node's block, probed
    calls = [c for c in calls if c[2] != "launcher.backends.ports"]
    assert len(calls) == 3   # the head runs in the background; the wait_ray stand-in waits for it
    (head,) = [c for c in calls if c[2] == "ray.scripts.scripts"]
    (wait,) = [c for c in calls if c[2] == "launcher.backends.slurm.wait_ray"]
    (driver,) = [c for c in calls if c[2] == "launcher"]
    assert head[2:6] == ["ray.scripts.scripts", "start", "--head", "--block"]
    assert "--port=6385" in head and "--node-ip-address=10.0.0.1" in head and "--include-dashboard=false" in head
    assert "--min-worker-port=20010" in head and "--node-manager-port=20001" in head and not any(a.endswith(("=6380", "=8076", "=8266")) for a in head)
    assert wait[2:6] == ["launcher.backends.slurm.wait_ray", "10.0.0.1:6385", "2", "600"]
    run_dir = str(home / "launcher-runs" / RUN_ID)
    assert driver[2:9] == ["launcher", "run", f"{run_dir}/skypilot/recipe.yaml", "--run-dir", run_dir,
                           "--ray-address", "10.0.0.1:6385"]
    assert f"WINDOW={window}" in driver and "TOKEN=tok123" in driver


def test_other_ranks_join_the_head_and_run_no_driver(tmp_path):
    task = render_task(recipe(nodes=4), load_profile(ROOT / "cluster/example-skypilot.yaml"), **FIXED)
    _, _, env = _run_env(tmp_path, 2, "10.0.0.1\n10.0.0.2\n10.0.0.3\n10.0.0.4\n")
    res = _bash(task.config["run"], tmp_path, env, tmp_path)
    assert res.returncode == 0, res.stderr
    calls = [c for c in _calls(tmp_path / "calls.log") if c[1] == "-m" and c[2] != "launcher.backends.ports"]
    assert len(calls) == 1
    assert calls[0][2:6] == ["ray.scripts.scripts", "start", "--address=10.0.0.1:6385", "--block"]
    assert "--node-ip-address=10.0.0.3" in calls[0] and "TOKEN=tok123" in calls[0]


def test_driver_exit_codes_pass_through(tmp_path):
    task = render_task(recipe(), load_profile(ROOT / "cluster/example-skypilot.yaml"), **FIXED)
    _, _, env = _run_env(tmp_path, 0, "10.0.0.1", STUB_DRIVER_CODE=str(EXIT_PREEMPTED))
    res = _bash(task.config["run"], tmp_path, env, tmp_path)
    assert res.returncode == EXIT_PREEMPTED and "managed job restarts" in res.stderr
    _, _, env = _run_env(tmp_path, 0, "10.0.0.1", STUB_DRIVER_CODE="3")
    assert _bash(task.config["run"], tmp_path, env, tmp_path).returncode == 3


def test_missing_ray_token_fails_before_anything_starts(tmp_path):
    task = render_task(recipe(), load_profile(ROOT / "cluster/example-skypilot.yaml"), **FIXED)
    _, _, env = _run_env(tmp_path, 0, "10.0.0.1")
    env.pop(RAY_TOKEN_SECRET)
    res = _bash(task.config["run"], tmp_path, {**env, RAY_TOKEN_SECRET: ""}, tmp_path)
    assert res.returncode != 0 and "Ray token secret is missing" in res.stderr
    assert not [c for c in _calls(tmp_path / "calls.log") if c[1:3] == ["-m", "ray.scripts.scripts"]]


@pytest.mark.parametrize("evil", EVIL, ids=range(len(EVIL)))
def test_run_id_with_shell_metacharacters_is_a_literal_path(tmp_path, evil):
    # run ids come from validated recipe names; the renderer quotes them anyway
    task = render_task(recipe(), load_profile(ROOT / "cluster/example-skypilot.yaml"),
                       **{**FIXED, "run_id": f"r{evil}x"})
    home, _, env = _run_env(tmp_path, 0, "10.0.0.1")
    res = _bash(task.config["run"], tmp_path, env, tmp_path)
    assert res.returncode == 0, res.stderr
    assert not list(tmp_path.rglob("PWNED")) and not list(Path.cwd().glob("PWNED"))
    driver = next(c for c in _calls(tmp_path / "calls.log") if c[1:4] == ["-m", "launcher", "run"])
    assert driver[6] == str(home / "launcher-runs" / f"r{evil}x")


def test_spot_notice_watcher_only_on_spot():
    spot = render_task(recipe(), load_profile(ROOT / "cluster/example-skypilot.yaml"), **FIXED).config["run"]
    ondemand = render_task(recipe(), load_profile(ROOT / "cluster/example-skypilot-gcp.yaml"), **FIXED).config["run"]
    assert "WATCH_SPOT_NOTICE=1" in spot and "WATCH_SPOT_NOTICE=0" in ondemand
    assert "spot/instance-action" in spot and "instance/preempted" in spot


def test_scripts_are_valid_bash():
    for case in CASES:
        t = task_for(case).config
        for part in ("setup", "run"):
            res = subprocess.run(["bash", "-n"], input=t[part], capture_output=True, text=True)
            assert res.returncode == 0, (case, part, res.stderr)


def test_secrets_are_names_only(monkeypatch):
    values = {"HF_TOKEN": "hf_SECRETSECRET1", "WANDB_API_KEY": "wandbSECRET2", "AWS_SECRET_ACCESS_KEY": "awsSECRET3"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    for case in CASES:
        text = task_for(case).yaml
        for v in values.values():
            assert v not in text
        assert "AWS_SECRET_ACCESS_KEY" not in text
