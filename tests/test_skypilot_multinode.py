"""SkyPilot's rendered `run` script, run for real on two nodes: the network namespaces of the
2-node dev cluster (`cluster/dev/slurm-up.sh --nodes 2`) stand in for two cloud VMs, and this test
for SkyPilot's provisioning (it starts the script once per node with SKYPILOT_NODE_IPS and
SKYPILOT_NODE_RANK set as SkyPilot sets them). Ray forms across both nodes and training completes
with the one-node loss curve."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_recipe_dict
from launcher.backends.profile import profile_from_dict
from launcher.backends.skypilot.render import RAY_TOKEN_SECRET, _run
from launcher.recipe import from_dict
from test_multinode import REFERENCE, mn_env  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

IPS = "10.231.7.11\n10.231.7.12\n"


def test_rendered_run_script_trains_across_two_nodes(mn_env, tmp_path):  # noqa: F811
    home = tmp_path / "home"
    venv_bin = home / ".launcher-venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec {ROOT / ".venv/bin/python"} "$@"\n')
    (venv_bin / "python").chmod(0o755)
    data = tiny_recipe_dict(name="sky-mn", train={"max_steps": 12, "micro_batch_size": 4, "lr": 1e-3},
                            resources={"cpu_workers": 2, "nodes": 2}, checkpoint={"every_steps": 3})
    profile = profile_from_dict({"backend": "skypilot", "accelerators": "H100:1", "checkpoint_bucket": "s3://b/x",
                                 "ray_start_timeout_s": 300})
    # the task's run script as rendered (render_task refuses CPU recipes for the cloud; the script
    # itself does not care), with the run directory SkyPilot's file mounts would have made
    script = tmp_path / "run.sh"
    script.write_text(_run(from_dict(data), profile, "~/launcher-runs/sky-mn"))
    run_dir = home / "launcher-runs" / "sky-mn"
    (run_dir / "skypilot").mkdir(parents=True)
    (run_dir / "skypilot" / "recipe.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "HOME": str(home), "SKYPILOT_NODE_IPS": IPS, "SKYPILOT_NUM_NODES": "2",
           "SKYPILOT_CLUSTER_INFO": '{"cluster_name": "c", "cloud": "aws", "region": "r", "zone": null}',
           RAY_TOKEN_SECRET: "tok-" + os.urandom(8).hex(), "LAUNCHER_PORT_LOCKS": str(tmp_path / "locks")}
    env.pop("RAY_ADDRESS", None)
    nodes = []
    for rank in (0, 1):
        log = open(tmp_path / f"rank{rank}.log", "w")
        nodes.append(subprocess.Popen(
            ["nsenter", f"--net=/run/netns/lnch-node{rank + 1}", "bash", str(script)], cwd=ROOT,
            env={**env, "SKYPILOT_NODE_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT))
    t0 = time.monotonic()
    try:
        code = nodes[0].wait(timeout=900)
    finally:
        for p in nodes:
            if p.poll() is None:
                p.terminate()
        for p in nodes:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    out = (tmp_path / "rank0.log").read_text(errors="replace")
    assert code == 0, out[-3000:] + "\n--- rank 1 ---\n" + (tmp_path / "rank1.log").read_text(errors="replace")[-2000:]
    assert "ray: 2/2 nodes joined at 10.231.7.11:6385" in out
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert next(m for m in metrics if m.get("event") == "start")["world_size"] == 2
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert sorted(losses) == list(range(1, 13))
    for step, loss in losses.items():
        assert loss == pytest.approx(REFERENCE[str(step)], rel=1e-5), f"step {step}"
    print(f"SkyPilot run script on 2 namespaces: {time.monotonic() - t0:.0f}s")
