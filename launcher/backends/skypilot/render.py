"""Render the SkyPilot task of a run: a pure function of the resolved recipe, the profile and a
few names (checked by golden files in tests/golden/skypilot/ and by SkyPilot's own parser).

What the task does, on every node (SkyPilot starts `setup`, then `run`, once per node):
1. `file_mounts` mount the bucket prefix `<checkpoint_bucket>/<run-id>` at the run directory's
   `checkpoints/` and copy the submitted recipe to `<run_dir>/skypilot/recipe.yaml`;
2. `setup` runs the profile's setup lines, creates `~/.launcher-venv` and installs the project
   (SkyPilot's `workdir`, the directory `launcher submit` ran in) with the pinned torch first;
3. `run` starts a Ray head on node rank 0 and a Ray worker on every other node, on ports apart
   from SkyPilot's own Ray (which uses 6380, 8076, 8266 and 10002-19999), bound to the node's
   cluster address from `SKYPILOT_NODE_IPS`, with a token that only the task's secrets hold;
4. rank 0 waits for every node, then runs the driver (`launcher run`), which resumes from the
   latest committed checkpoint in the bucket on every start: the first one, and each restart of
   a managed job after a preemption. It forwards TERM/USR1 (and, on spot, the cloud's
   preemption notice) to the driver, which commits a checkpoint and exits 75; the managed job
   restarts on that code (`recover_on_exit_codes`). The other ranks serve Ray until the head goes.

Every value from the recipe or the profile that reaches a shell is quoted with `shlex.quote`;
secrets appear only as names under `secrets:` (their values are given to SkyPilot at launch,
from the caller's environment, and never written anywhere).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from launcher.backends import jobscript as js
from launcher.backends.skypilot.profile import PREEMPT_WINDOW_S, SkyPilotProfile
from launcher.errors import EXIT_PREEMPTED, UserError
from launcher.recipe.sections import Recipe

SKY_SUBDIR = "skypilot"
"""In the run directory (local and on the nodes): task.yaml and recipe.yaml as submitted."""
TASK_FILE = "task.yaml"
RECIPE_FILE = "recipe.yaml"
RAY_TOKEN_SECRET = "LAUNCHER_RAY_AUTH_TOKEN"
"""A random token made at launch and passed as a secret: every node of the task knows it, nobody
else on the network can submit work to the run's Ray (no auth is remote code execution)."""

RAY_PORT = 6385
"""GCS port of the run's Ray (fixed: the other nodes know the head only from SKYPILOT_NODE_IPS).
Each node's other ports are a block it reserves and probes for itself between 20000 and 31999
(launcher.backends.ports), apart from SkyPilot's own Ray (6380, 8076, 8266, 10002-19999)."""
PORT_FIRST, PORT_LAST = 20000, 31999
VENV = "~/.launcher-venv"


@dataclass(frozen=True)
class SkyTask:
    config: dict[str, Any]
    """The task as SkyPilot's YAML schema has it (what `sky.Task.from_yaml_config` takes)."""
    secret_names: list[str] = field(default_factory=list)

    @property
    def yaml(self) -> str:
        return yaml.dump(self.config, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (setup, run) as literal blocks, readable in the task file."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


_q = js.q


def _home_path(path: str) -> str:
    """A shell word for `path`, with a leading `~/` as `"$HOME"/...` (quoting stops `~` expanding)."""
    if path.startswith("~/"):
        return '"$HOME"/' + _q(path[2:])
    return _q(path)


def cluster_name(run_id: str) -> str:
    """A SkyPilot cluster name for an on-demand run (lower case, letters, digits and dashes)."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    return ("l-" + name)[:60].rstrip("-")


def run_dir_on_nodes(profile: SkyPilotProfile, run_id: str) -> str:
    return f"{profile.runs_root.rstrip('/')}/{run_id}"


def bucket_uri(profile: SkyPilotProfile, run_id: str) -> str:
    return f"{profile.checkpoint_bucket.rstrip('/')}/{run_id}"


def check_fits(recipe: Recipe, profile: SkyPilotProfile) -> None:
    r = recipe.resources
    js.check_gpus_fit(recipe, profile.gpus_per_node, f"the profile's nodes (accelerators: {profile.accelerators})")
    if r.gpus_per_node == 0:
        raise UserError(
            f"the recipe trains on CPU workers (resources.gpus_per_node is 0): set "
            f"resources.gpus_per_node={profile.gpus_per_node} to use the profile's {profile.accelerators}"
        )


def render_task(
    recipe: Recipe,
    profile: SkyPilotProfile,
    *,
    run_id: str,
    workdir: str,
    recipe_file: str,
    secret_names: list[str] | None = None,
) -> SkyTask:
    """The SkyPilot task for `recipe` on `profile`.

    `workdir` is the project directory SkyPilot syncs to the nodes (relative data paths in the
    recipe resolve there); `recipe_file` the local copy of the resolved recipe; `secret_names`
    the variables passed as secrets (default: the profile's), besides the Ray token.
    """
    check_fits(recipe, profile)
    r = recipe.resources
    run_dir = run_dir_on_nodes(profile, run_id)
    resources: dict[str, Any] = {"accelerators": profile.accelerators, "use_spot": profile.use_spot,
                                 "disk_size": profile.disk_size}
    if profile.image:
        resources["image_id"] = profile.image
    infra = profile.infra()
    if len(infra) == 1:
        resources["infra"] = infra[0]
    elif infra:
        resources["any_of"] = [{"infra": i} for i in infra]
    if profile.use_spot:
        resources["job_recovery"] = {
            "strategy": profile.job_recovery,
            "max_restarts_on_errors": profile.max_restarts_on_errors,
            "recover_on_exit_codes": [EXIT_PREEMPTED],
        }
    names = list(profile.secrets if secret_names is None else secret_names)
    names = [n for n in names if n != RAY_TOKEN_SECRET] + [RAY_TOKEN_SECRET]
    config: dict[str, Any] = {
        "name": run_id,
        "workdir": workdir,
        "num_nodes": r.nodes,
        "resources": resources,
        "file_mounts": {
            f"{run_dir}/checkpoints": {"source": bucket_uri(profile, run_id), "store": profile.bucket_store,
                                       "mode": profile.checkpoint_mount_mode},
            f"{run_dir}/{SKY_SUBDIR}/{RECIPE_FILE}": recipe_file,
        },
        "envs": {"LAUNCHER_RUN_ID": run_id, "LAUNCHER_BACKEND": "skypilot", **profile.env},
        "secrets": {n: None for n in names},
        "setup": _setup(profile),
        "run": _run(recipe, profile, run_dir),
    }
    return SkyTask(config, names)


def _setup(profile: SkyPilotProfile) -> str:
    lines = ["set -euo pipefail", *js.setup_lines(profile.setup)]
    lines += [
        "# The project (SkyPilot's workdir, here) in its own environment; torch pinned first.",
        f'[ -x {_home_path(VENV)}/bin/python ] || {_q(profile.python)} -m venv {_home_path(VENV)}',
        f'PIP={_home_path(VENV)}/bin/pip',
        '"$PIP" install -q --upgrade pip',
        '"$PIP" install -q "$(grep \'^torch==\' requirements-lock.txt)"',
        '"$PIP" install -q -c requirements-lock.txt -e .',
    ]
    return "\n".join(lines) + "\n"


def _run(recipe: Recipe, profile: SkyPilotProfile, run_dir: str) -> str:
    windows = " ".join(f"{c}) WINDOW={s} ;;" for c, s in PREEMPT_WINDOW_S.items())
    head = [
        "set -uo pipefail",
        "# Values from the recipe and the cluster profile, quoted.",
        f"RUN_DIR={_home_path(run_dir)}",
        f"PY={_home_path(VENV)}/bin/python",
        f"NODES={int(recipe.resources.nodes)}",
        f"RAY_START_TIMEOUT={int(profile.ray_start_timeout_s)}",
        f"WATCH_SPOT_NOTICE={1 if profile.use_spot else 0}",
        "",
    ]
    subs = {
        "%(windows)s": windows, "%(port)d": str(RAY_PORT), "%(token)s": RAY_TOKEN_SECRET,
        "%(preempted)d": str(EXIT_PREEMPTED), "%(sky)s": SKY_SUBDIR, "%(recipe)s": RECIPE_FILE,
        "%(first)d": str(PORT_FIRST), "%(last)d": str(PORT_LAST), "%(ray_env)s": js.RAY_ENV,
        "%(reserve)s": js.RESERVE_PORTS, "%(ray_ports)s": js.ray_ports("PORT_BASE"),
        "%(window)s": js.export_window("$WINDOW"),
        "%(ray_head)s": js.ray_start("head", str(RAY_PORT)),
        "%(forward)s": js.forward_and_wait(),
        "%(join)s": js.join_until(js.ray_start("worker", "") + ' --node-ip-address="$NODE_IP"', "  "),
    }
    body = _RUN
    for key, value in subs.items():
        body = body.replace(key, value)
    return "\n".join(head) + body


_RUN = """\
RECIPE_YAML="$RUN_DIR/%(sky)s/%(recipe)s"
RANK="${SKYPILOT_NODE_RANK:-0}"
HEAD_IP="$(printf '%s\\n' "${SKYPILOT_NODE_IPS:-127.0.0.1}" | sed -n 1p)"
NODE_IP="$(printf '%s\\n' "${SKYPILOT_NODE_IPS:-127.0.0.1}" | sed -n "$((RANK + 1))p")"
mkdir -p "$RUN_DIR/%(sky)s"
export LAUNCHER_RUN_DIR="$RUN_DIR"

# The cloud SkyPilot chose decides how long a preemption notice gives (AWS 2 min, GCP/Azure 30 s).
CLOUD="$("$PY" -c 'import json, os; print(str(json.loads(os.environ.get("SKYPILOT_CLUSTER_INFO") or "{}").get("cloud") or "").lower())' 2>/dev/null)"
WINDOW=30
case "$CLOUD" in %(windows)s esac
export LAUNCHER_CLOUD="$CLOUD"
%(window)s

# The run's own Ray, apart from SkyPilot's: its own ports (a block this node reserves and probes
# for itself), bound to the node's cluster address, which gloo binds to as well; no dashboard;
# token authentication with a token only this task's secrets hold.
%(ray_env)s
export RAY_AUTH_TOKEN="${%(token)s:?the Ray token secret is missing}"
RAY_ADDRESS_JOB="$HEAD_IP:%(port)d"
RAY_CPUS="$(nproc)"
RAY_PORT_BLOCK=$(( (10 + (2 * RAY_CPUS > 90 ? 2 * RAY_CPUS : 90) + 99) / 100 * 100 ))   # ports.block_size
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$(ip -4 -o addr show 2>/dev/null | awk -v ip="$NODE_IP" '{split($4, a, "/"); if (a[1] == ip) {print $2; exit}}')}"
[ -n "$GLOO_SOCKET_IFNAME" ] || unset GLOO_SOCKET_IFNAME
%(reserve)s
PORT_BASE="$(reserve_ports "$NODE_IP" %(first)d %(last)d %(first)d)" || exit 1
%(ray_ports)s

if [ "$RANK" -ne 0 ]; then
  # A worker: wait for the head, serve Ray until the head goes away (the driver ended).
  deadline=$((SECONDS + RAY_START_TIMEOUT))
  until "$PY" -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)' "$HEAD_IP" %(port)d 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "launcher: no Ray head at $RAY_ADDRESS_JOB" >&2; exit 1; }
    sleep 3
  done
%(join)s
fi

%(ray_head)s --node-ip-address="$NODE_IP" &
RAY_PID=$!
stop_ray() {
  kill -TERM "$RAY_PID" 2>/dev/null
  wait "$RAY_PID" 2>/dev/null
}
if ! "$PY" -m launcher.backends.slurm.wait_ray "$RAY_ADDRESS_JOB" "$NODES" "$RAY_START_TIMEOUT"; then
  stop_ray
  exit 1
fi

# The driver resumes from the latest committed checkpoint in the bucket (none: from step 0).
"$PY" -m launcher run "$RECIPE_YAML" --run-dir "$RUN_DIR" --ray-address "$RAY_ADDRESS_JOB" &
DRIVER=$!

# Spot: poll the cloud's preemption notice and warn the driver as soon as it comes.
spot_notice() {
  case "$CLOUD" in
    aws)
      local t
      t="$(curl -s -m 2 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://169.254.169.254/latest/api/token)"
      curl -sf -m 2 -H "X-aws-ec2-metadata-token: $t" http://169.254.169.254/latest/meta-data/spot/instance-action >/dev/null ;;
    gcp)
      [ "$(curl -s -m 2 -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/instance/preempted)" = TRUE ] ;;
    *) return 1 ;;
  esac
}
WATCHER=
if [ "$WATCH_SPOT_NOTICE" = 1 ] && command -v curl >/dev/null; then
  ( while kill -0 "$DRIVER" 2>/dev/null; do
      if spot_notice; then echo "launcher: preemption notice from $CLOUD" >&2; kill -s USR1 "$DRIVER"; break; fi
      sleep 5
    done ) &
  WATCHER=$!
fi

%(forward)s
[ -n "$WATCHER" ] && kill "$WATCHER" 2>/dev/null
stop_ray
[ "$CODE" -eq %(preempted)d ] && echo "launcher: stopped for a preemption; the managed job restarts and resumes" >&2
exit "$CODE"
"""
