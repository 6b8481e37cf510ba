"""Render the sbatch script of a run: a pure function of the resolved recipe, the cluster
profile and the run directory (checked by golden files in tests/golden/slurm/).

What the script does, in order:
1. asks for `resources.nodes` nodes with one task per node, `--requeue`, and
   `--signal=B:USR1@<lead>` (only the batch shell is warned; it forwards the signal);
2. runs the profile's setup lines and exports its environment;
3. starts the Ray head on the first node and a Ray worker on every other node through `srun`,
   bound to the node's cluster address, on ports derived from the job id, with a token that
   exists only in the job's environment; waits until every node has joined;
4. runs the driver (`launcher run`) on the first node against that Ray cluster, in the background,
   trapping USR1 and TERM and forwarding them to it;
5. when the driver exits with the preempted code (75) after committing a checkpoint, requeues the
   job (`scontrol requeue`): the next allocation runs the same script, and `launcher run` resumes
   from the latest committed checkpoint in the run directory.

Every value that comes from the recipe or the profile is quoted with `shlex.quote` (or, for
`#SBATCH` directives, restricted to a safe character set by the profile's validation and checked
again here), so a value with `;`, `$(...)`, backticks or a newline is never executed. Secrets are
not rendered at all: sbatch passes the submitting environment on to the job.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass

from launcher.backends.profile import _DIRECTIVE, ClusterProfile
from launcher.errors import EXIT_PREEMPTED, UserError
from launcher.recipe.sections import Recipe

SLURM_SUBDIR = "slurm"
"""Inside the run directory: job.sbatch, recipe.yaml (as submitted), job.out, events.jsonl."""
SCRIPT_FILE = "job.sbatch"
RECIPE_FILE = "recipe.yaml"
OUTPUT_FILE = "job.out"
EVENTS_FILE = "events.jsonl"
CANCEL_FILE = "cancel-requested"

PORT_SLOTS = 220
"""Ray ports: job J uses 10000 + (J mod 220) * 100 ... +99, below Linux's ephemeral range."""


@dataclass(frozen=True)
class SbatchJob:
    script: str
    """The batch script (goes to <run_dir>/slurm/job.sbatch)."""
    sbatch_args: list[str]
    """Options given to sbatch on its command line (paths, which need no shell quoting there)."""

    def command(self, script_path: str) -> list[str]:
        return ["sbatch", "--parsable", *self.sbatch_args, script_path]


def cpus_per_node(recipe: Recipe, profile: ClusterProfile) -> int:
    """CPU cores asked for on each node: the profile's, else what the workers on a node need."""
    if profile.cpus_per_node:
        return profile.cpus_per_node
    r = recipe.resources
    workers_per_node = r.gpus_per_node or math.ceil(r.cpu_workers / r.nodes)
    return max(1, workers_per_node * r.cpus_per_worker)


def check_fits(recipe: Recipe, profile: ClusterProfile) -> None:
    """The recipe must fit the profile's nodes."""
    r = recipe.resources
    if r.gpus_per_node > profile.gpus_per_node:
        raise UserError(
            f"the recipe asks for {r.gpus_per_node} GPUs per node (resources.gpus_per_node) but the "
            f"cluster profile's nodes have {profile.gpus_per_node} (gpus_per_node)"
        )
    if profile.cpus_per_node and r.gpus_per_node == 0:
        need = math.ceil(r.cpu_workers / r.nodes) * r.cpus_per_worker
        if need > profile.cpus_per_node:
            raise UserError(
                f"the recipe's CPU workers need {need} cores per node (resources.cpu_workers x "
                f"cpus_per_worker over {r.nodes} node(s)) but the profile gives {profile.cpus_per_node} "
                "(cpus_per_node)"
            )


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _directive(option: str, value: object) -> str:
    text = str(value)
    if not _DIRECTIVE.fullmatch(text):  # the profile checks this; a second line of defence
        raise UserError(f"{option}: {text!r} cannot be written into an #SBATCH directive")
    return f"#SBATCH --{option}={text}"


def _setup_line(line: str) -> str:
    return " ".join(_q(w) for w in shlex.split(line))


def render_sbatch(
    recipe: Recipe,
    profile: ClusterProfile,
    run_dir: str,
    *,
    run_id: str,
    python: str,
    workdir: str,
) -> SbatchJob:
    """The sbatch script and command-line options for `recipe` on `profile`.

    `run_dir` (absolute, on the shared filesystem) holds the submitted recipe at
    `slurm/recipe.yaml`; `python` has launcher installed on the nodes; `workdir` is where the
    driver runs (relative data paths in the recipe are resolved there).
    """
    check_fits(recipe, profile)
    r = recipe.resources
    d = [
        "#!/bin/bash",
        f"# launcher run {run_id}: {r.nodes} node(s), one task per node; written by `launcher submit`.",
        _directive("job-name", recipe.name),
        _directive("nodes", r.nodes),
        "#SBATCH --ntasks-per-node=1",
        _directive("cpus-per-task", cpus_per_node(recipe, profile)),
    ]
    if r.gpus_per_node:
        d.append(_directive("gres", f"{profile.gres}:{r.gpus_per_node}"))
    if profile.mem_per_node is not None:
        d.append(_directive("mem", profile.mem_per_node))
    for option, value in (
        ("partition", profile.partition),
        ("account", profile.account),
        ("qos", profile.qos),
        ("constraint", profile.constraint),
    ):
        if value:
            d.append(_directive(option, value))
    d.append(_directive("time", profile.time_limit))
    if profile.exclusive:
        d.append("#SBATCH --exclusive")
    d += [
        f"#SBATCH --signal=B:USR1@{int(profile.preempt_signal_lead_s)}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "",
        "set -uo pipefail",
        "",
        "# Values from the recipe and the cluster profile, quoted.",
        f"RUN_DIR={_q(run_dir)}",
        f"WORKDIR={_q(workdir)}",
        f"PY={_q(python)}",
        f"RAY_START_TIMEOUT={int(profile.ray_start_timeout_s)}",
        f"MAX_RESTARTS={int(profile.max_restarts)}",
        f"export LAUNCHER_RUN_ID={_q(run_id)}",
        "export LAUNCHER_BACKEND=slurm",
    ]
    if profile.network_interface:
        d.append(f"NET_IFACE={_q(profile.network_interface)}")
    else:
        d.append("NET_IFACE=")
    for name, value in profile.env.items():
        d.append(f"export {name}={_q(value)}")  # the profile checked that `name` is an identifier
    d.append("")
    d += _BODY_HEAD
    if profile.setup:
        d.append("# Setup lines of the cluster profile (one command each, arguments quoted).")
        d += [_setup_line(line) for line in profile.setup]
        d.append("")
    d += _BODY_RAY + _BODY_DRIVER
    return SbatchJob("\n".join(d) + "\n", [f"--output={_escape_pattern(run_dir)}/{SLURM_SUBDIR}/{OUTPUT_FILE}"])


def _escape_pattern(path: str) -> str:
    """sbatch expands `%x` in --output; `%%` is a literal percent sign."""
    return path.replace("%", "%%")


_BODY_HEAD = f"""\
SLURM_DIR="$RUN_DIR/{SLURM_SUBDIR}"
RECIPE_YAML="$SLURM_DIR/{RECIPE_FILE}"
EVENTS="$SLURM_DIR/{EVENTS_FILE}"
RESTART="${{SLURM_RESTART_COUNT:-0}}"

# One JSON line per event in the run directory: what `launcher status` reads besides Slurm.
event() {{
  printf '{{"event": "%s", "job_id": "%s", "restart": %d, "time": %s%s}}\\n' \\
    "$1" "$SLURM_JOB_ID" "$RESTART" "$(date +%s)" "${{2:-}}" >>"$EVENTS"
}}
event start ", \\"nodes\\": $SLURM_JOB_NUM_NODES"
cd "$WORKDIR" || {{ event exit ', "code": 1'; exit 1; }}
""".splitlines()

_BODY_RAY = """\
# The node's address on the cluster network (Ray binds to it; nothing listens on 0.0.0.0).
node_ip() {
  if [ -n "$NET_IFACE" ]; then
    ip -4 -o addr show dev "$NET_IFACE" | awk '{split($4, a, "/"); print a[1]; exit}'
  else
    hostname -I | awk '{print $1}'
  fi
}
export -f node_ip
export NET_IFACE

# Ray: the head on the first node, one worker on each other node, all started through srun.
# Ports come from the job id, so that jobs sharing a node do not collide; no dashboard; a token
# that lives only in this job's environment (RAY_AUTH_TOKEN) guards the cluster.
HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
HEAD_IP="$(node_ip)"
if [ -z "$HEAD_IP" ]; then
  echo "launcher: no IPv4 address for Ray on $(hostname) (network_interface: ${NET_IFACE:-none})" >&2
  event exit ', "code": 1, "reason": "no address"'
  exit 1
fi
PORT_BASE=$((10000 + (SLURM_JOB_ID % %(slots)d) * 100))
RAY_ADDRESS_JOB="$HEAD_IP:$PORT_BASE"
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')"
export RAY_AUTH_TOKEN
export RAY_USAGE_STATS_ENABLED=0
RAY_PORTS=(
  --node-manager-port=$((PORT_BASE + 1)) --object-manager-port=$((PORT_BASE + 2))
  --ray-client-server-port=$((PORT_BASE + 3)) --dashboard-agent-grpc-port=$((PORT_BASE + 4))
  --dashboard-agent-listen-port=$((PORT_BASE + 5)) --metrics-export-port=$((PORT_BASE + 6))
  --runtime-env-agent-port=$((PORT_BASE + 7))
  --min-worker-port=$((PORT_BASE + 10)) --max-worker-port=$((PORT_BASE + 99))
)
RAY_CPUS="${SLURM_CPUS_PER_TASK:-1}"
srun --overlap --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" \\
  bash -c 'exec "$@" --node-ip-address="$(node_ip)"' ray-head \\
  "$PY" -m ray.scripts.scripts start --head --block --port="$PORT_BASE" --include-dashboard=false \\
  --disable-usage-stats --num-cpus="$RAY_CPUS" "${RAY_PORTS[@]}" &
RAY_PIDS=($!)
if [ "$SLURM_JOB_NUM_NODES" -gt 1 ]; then
  sleep 5
  srun --overlap --nodes=$((SLURM_JOB_NUM_NODES - 1)) --ntasks=$((SLURM_JOB_NUM_NODES - 1)) \\
    --ntasks-per-node=1 --exclude="$HEAD_NODE" \\
    bash -c 'exec "$@" --node-ip-address="$(node_ip)"' ray-worker \\
    "$PY" -m ray.scripts.scripts start --address="$RAY_ADDRESS_JOB" --block \\
    --disable-usage-stats --num-cpus="$RAY_CPUS" "${RAY_PORTS[@]}" &
  RAY_PIDS+=($!)
fi

stop_ray() {
  kill -TERM "${RAY_PIDS[@]}" 2>/dev/null
  wait "${RAY_PIDS[@]}" 2>/dev/null
}

if ! "$PY" -m launcher.backends.slurm.wait_ray "$RAY_ADDRESS_JOB" "$SLURM_JOB_NUM_NODES" "$RAY_START_TIMEOUT"; then
  event exit ', "code": 1, "reason": "ray"'
  stop_ray
  exit 1
fi
event ray_ready
""".replace("%(slots)d", str(PORT_SLOTS)).splitlines()

_BODY_DRIVER = f"""\

# The driver runs on this (the first) node, in the background so that the batch shell can
# forward Slurm's warning signal (USR1, --signal=B:USR1@lead) and TERM to it.
"$PY" -m launcher run "$RECIPE_YAML" --run-dir "$RUN_DIR" --ray-address "$RAY_ADDRESS_JOB" &
DRIVER=$!
forward() {{
  event signal ", \\"signal\\": \\"$1\\""
  kill -s "$1" "$DRIVER" 2>/dev/null
}}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
CODE=0
while :; do
  wait "$DRIVER"
  CODE=$?
  kill -0 "$DRIVER" 2>/dev/null || break   # a trapped signal interrupted `wait`: wait again
done
if [ "$CODE" -gt 128 ]; then  # the driver ended while a signal was being handled
  wait "$DRIVER" 2>/dev/null
  LAST=$?
  [ "$LAST" -ne 127 ] && CODE=$LAST
fi
trap - USR1 TERM
event exit ", \\"code\\": $CODE"
stop_ray

if [ "$CODE" -eq {EXIT_PREEMPTED} ]; then
  STATE="$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null)"
  if [ -e "$SLURM_DIR/{CANCEL_FILE}" ]; then
    event cancelled
  elif [ "$RESTART" -ge "$MAX_RESTARTS" ]; then
    event gave_up ", \\"max_restarts\\": $MAX_RESTARTS"
  elif [ "$STATE" != RUNNING ] && [ -n "$STATE" ]; then
    event not_requeued ", \\"state\\": \\"$STATE\\""   # cancelled or ended by Slurm itself
  else
    event requeue
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    event requeue_failed
  fi
fi
exit "$CODE"
""".splitlines()
