"""Render the sbatch script of a run: a pure function of the resolved recipe, the cluster
profile and the run directory (checked by golden files in tests/golden/slurm/).

What the script does, in order:
1. asks for `resources.nodes` nodes with one task per node, `--requeue`, and
   `--signal=B:USR1@<lead>` (only the batch shell is warned; it forwards the signal);
2. runs the profile's setup lines and exports its environment;
3. starts the Ray head on the first node and a Ray worker on every other node through `srun`
   (one step per node, so that a node that dies is known by name), bound to the node's cluster
   address, on a block of ports each node reserves and probes for itself
   (`launcher.backends.ports`), with a token that exists only in the job's environment; waits
   until every node has joined;
4. runs the driver (`launcher run`) on the first node against that Ray cluster, in the background,
   trapping USR1 and TERM and forwarding them to it;
5. when the driver exits with the preempted code (75) after committing a checkpoint, or fails
   after a node was lost, requeues the job (`scontrol requeue`), excluding nodes that failed
   `exclude_node_after` times: the next allocation runs the same script, and `launcher run`
   resumes from the latest committed checkpoint in the run directory.

Every value that comes from the recipe or the profile is quoted with `shlex.quote` (or, for
`#SBATCH` directives, restricted to a safe character set by the profile's validation and checked
again here), so a value with `;`, `$(...)`, backticks or a newline is never executed. Secrets are
not rendered at all, nor handed to sbatch (slurmctld stores a job's environment): the job gets an
explicit list of variables (`--export=`), and reads secrets at run time from the profile's
`secrets_file`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from launcher.backends import jobscript as js
from launcher.backends.ports import block_size
from launcher.checkpoint.preempt import STOP_FILE
from launcher.backends.profile import _DIRECTIVE, SECRET_NAME, ClusterProfile
from launcher.errors import EXIT_PREEMPTED, UserError
from launcher.recipe.load import env_variables
from launcher.recipe.sections import Recipe

SLURM_SUBDIR = "slurm"
"""Inside the run directory: job.sbatch, recipe.yaml (as submitted), job.out, events.jsonl."""
SCRIPT_FILE = "job.sbatch"
RECIPE_FILE = "recipe.yaml"
OUTPUT_FILE = "job.out"
EVENTS_FILE = "events.jsonl"
CANCEL_FILE = "cancel-requested"

PORT_SLOTS = 220
"""Ray ports: job J prefers the block at 10000 + (J mod 220) * 100; another job or program holding
it moves the node to the next free block below 32000 (Linux's ephemeral range starts at 32768)."""
PORT_FIRST, PORT_LAST = 10000, 31999

EXPORTED = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH",
    "LD_LIBRARY_PATH", "CUDA_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR", "LAUNCHER_STATE_DIR", "LAUNCHER_PORT_LOCKS",
)
"""The submitting environment's variables the job gets (`sbatch --export=`, besides Slurm's own
SLURM_*): what finds the interpreter, libraries and caches. Anything else, secrets above all, stays
out of the job and out of slurmctld's stored copy of its environment."""


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
    js.check_gpus_fit(recipe, profile.gpus_per_node, "the cluster profile's nodes (gpus_per_node)")
    if profile.cpus_per_node and r.gpus_per_node == 0:
        need = math.ceil(r.cpu_workers / r.nodes) * r.cpus_per_worker
        if need > profile.cpus_per_node:
            raise UserError(
                f"the recipe's CPU workers need {need} cores per node (resources.cpu_workers x "
                f"cpus_per_worker over {r.nodes} node(s)) but the profile gives {profile.cpus_per_node} "
                "(cpus_per_node)"
            )


def exported_names(recipe: Recipe) -> list[str]:
    """`--export=` of the job: EXPORTED and the variables the recipe reads (`${oc.env:...}`),
    except those that look like secrets (the job reads those from the profile's secrets_file)."""
    extra = [n for n in env_variables(recipe) if not SECRET_NAME.search(n)]
    return list(dict.fromkeys([*EXPORTED, *extra]))


def _directive(option: str, value: object) -> str:
    text = str(value)
    if not _DIRECTIVE.fullmatch(text):  # the profile checks this; a second line of defence
        raise UserError(f"{option}: {text!r} cannot be written into an #SBATCH directive")
    return f"#SBATCH --{option}={text}"


def _directives(recipe: Recipe, profile: ClusterProfile, run_id: str) -> list[str]:
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
    return d + [
        f"#SBATCH --signal=B:USR1@{int(profile.preempt_signal_lead_s)}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        _directive("export", ",".join(exported_names(recipe))),
    ]


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
    q = js.q
    d = _directives(recipe, profile, run_id) + [
        "",
        "set -uo pipefail",
        "",
        "# Values from the recipe and the cluster profile, quoted.",
        f"RUN_DIR={q(run_dir)}",
        f"WORKDIR={q(workdir)}",
        f"PY={q(python)}",
        f"RAY_START_TIMEOUT={int(profile.ray_start_timeout_s)}",
        f"RAY_PORT_BLOCK={block_size(cpus_per_node(recipe, profile))}",
        f"MAX_RESTARTS={int(profile.max_restarts)}",
        f"EXCLUDE_NODE_AFTER={int(profile.exclude_node_after)}",
        f"SECRETS_FILE={q(profile.secrets_file or '')}",
        f"NET_IFACE={q(profile.network_interface or '')}",
        f"export LAUNCHER_RUN_ID={q(run_id)}",
        "export LAUNCHER_BACKEND=slurm",
        js.export_window(str(int(profile.preempt_signal_lead_s))),
        "export SLURM_EXPORT_ENV=ALL   # the job's srun steps get its whole environment (Ray's token)",
    ]
    for name, value in profile.env.items():
        d.append(f"export {name}={q(value)}")  # the profile checked that `name` is an identifier
    d += ["", *_BODY_HEAD, *js.setup_lines(profile.setup), "", *_body_ray(), *_body_driver()]
    return SbatchJob("\n".join(d) + "\n", [f"--output={_escape_pattern(run_dir)}/{SLURM_SUBDIR}/{OUTPUT_FILE}"])


def _escape_pattern(path: str) -> str:
    """sbatch expands `%x` in --output; `%%` is a literal percent sign."""
    return path.replace("%", "%%")


_BODY_HEAD = f"""\
SLURM_DIR="$RUN_DIR/{SLURM_SUBDIR}"
RECIPE_YAML="$SLURM_DIR/{RECIPE_FILE}"
EVENTS="$SLURM_DIR/{EVENTS_FILE}"
RESTART="${{SLURM_RESTART_COUNT:-0}}"
export EVENTS RESTART

# One JSON line per event in the run directory: what `launcher status` reads besides Slurm.
event() {{
  printf '{{"event": "%s", "job_id": "%s", "restart": %d, "time": %s%s}}\\n' \\
    "$1" "$SLURM_JOB_ID" "$RESTART" "$(date +%s)" "${{2:-}}" >>"$EVENTS"
}}
export -f event
event start ", \\"nodes\\": $SLURM_JOB_NUM_NODES, \\"nodelist\\": \\"$SLURM_JOB_NODELIST\\""
cd "$WORKDIR" || {{ event exit ', "code": 1'; exit 1; }}

# Secrets come from a file only the user can read (secrets_file), never through sbatch: slurmctld
# keeps a copy of what sbatch sends. NAME=value lines, taken literally (nothing is evaluated).
SECRETS_FILE="${{SECRETS_FILE/#\\~/$HOME}}"
if [ -n "$SECRETS_FILE" ]; then
  if [ ! -r "$SECRETS_FILE" ]; then
    echo "launcher: cannot read secrets_file $SECRETS_FILE on $(hostname)" >&2
    event exit ', "code": 1, "reason": "secrets_file"'
    exit 1
  fi
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in ''|'#'*) continue ;; esac
    name="${{line%%=*}}"
    [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] && export "$name=${{line#*=}}"
  done <"$SECRETS_FILE"
  unset line name
fi
""".splitlines()


def _ray_node_functions() -> list[str]:
    """Shell functions every node step uses: its address and interface, its ports, its Ray."""
    worker_ports = js.ray_ports("base").replace("\n", "\n  ")
    text = f"""\
# The node's address on the cluster network (Ray binds to it; nothing listens on 0.0.0.0), and
# its interface, which gloo binds to (not what the host name resolves to: often 127.0.0.1).
node_ip() {{
  if [ -n "$NET_IFACE" ]; then
    ip -4 -o addr show dev "$NET_IFACE" | awk '{{split($4, a, "/"); print a[1]; exit}}'
  else
    hostname -I | awk '{{print $1}}'
  fi
}}
node_iface() {{
  ip -4 -o addr show | awk -v ip="$(node_ip)" '{{split($4, a, "/"); if (a[1] == ip) {{print $2; exit}}}}'
}}
{js.RESERVE_PORTS}

# ray_node head|worker, in an srun step on its node: this node's own block of ports (the head's
# was reserved by the batch shell on the same node), then Ray, bound to the node's address.
ray_node() {{
  local ip base deadline=$((SECONDS + RAY_START_TIMEOUT))
  ip="$(node_ip)"
  export GLOO_SOCKET_IFNAME="${{GLOO_SOCKET_IFNAME:-$(node_iface)}}"
  if [ "$1" = head ]; then
    base="$PORT_BASE"
  else
    until "$PY" -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)' "$HEAD_IP" "$PORT_BASE" 2>/dev/null; do
      [ "$SECONDS" -lt "$deadline" ] || {{ echo "launcher: no Ray head at $RAY_ADDRESS_JOB" >&2; exit 1; }}
      sleep 1
    done
    base="$(reserve_ports "$ip" {PORT_FIRST} {PORT_LAST} "$PORT_BASE")" || exit 1
    event ray_ports ", \\"node\\": \\"$SLURMD_NODENAME\\", \\"ip\\": \\"$ip\\", \\"base\\": $base"
  fi
  {worker_ports}
  if [ "$1" = head ]; then
    exec {js.ray_start("head", "$base")} --node-ip-address="$ip"
  fi
{js.join_until(js.ray_start("worker", "") + ' --node-ip-address="$ip"', "  ")}
}}
export -f node_ip node_iface reserve_ports ray_node
export NET_IFACE PY RAY_START_TIMEOUT RAY_PORT_BLOCK

"""
    return text.splitlines()


def _node_exclusion() -> list[str]:
    """The allocation's nodes, and a requeue without the ones that failed too often."""
    text = """\
# Ray: the head on this (the first) node, one srun step per other node, so that a node lost
# mid-run is known by name. Ports: a block each node reserves and probes for itself, starting
# at the job id's slot; no dashboard; a token that lives only in this job's environment.
NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
HEAD_NODE="${NODES[0]}"

# Nodes lost EXCLUDE_NODE_AFTER times under this run (over all its allocations) are excluded
# from its next ones; an allocation that holds one anyway (Slurm requeued the job itself after
# a node failure) goes straight back to the queue without it.
failed_nodes() {
  grep -o '"event": "node_failed".*"node": "[^"]*"' "$EVENTS" | sed 's/.*"node": "//; s/"$//' \\
    | sort | uniq -c | awk -v n="$EXCLUDE_NODE_AFTER" 'n > 0 && $1 >= n {print $2}' | paste -sd, -
}
requeue_excluding() {
  local bad
  bad="$(failed_nodes)"
  trap '' TERM   # Slurm signals the batch shell as it requeues; finish the update first
  scontrol requeue "$SLURM_JOB_ID" || return 1
  if [ -n "$bad" ]; then
    event exclude ", \\"nodes\\": \\"$bad\\""
    scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="$bad"
  fi
  return 0
}
BAD_HERE="$(failed_nodes | tr , '\\n' | grep -Fxf <(printf '%s\\n' "${NODES[@]}") | paste -sd, -)"
if [ -n "$BAD_HERE" ] && [ "$RESTART" -lt "$MAX_RESTARTS" ]; then
  echo "launcher: $BAD_HERE failed $EXCLUDE_NODE_AFTER times under this run: requeueing without it" >&2
  requeue_excluding && exit 0
fi
"""
    return text.splitlines()


def _ray_start() -> list[str]:
    """Ports and token, the Ray head and one worker step per other node, then wait for all."""
    text = f"""\
HEAD_IP="$(node_ip)"
if [ -z "$HEAD_IP" ]; then
  echo "launcher: no IPv4 address for Ray on $(hostname) (network_interface: ${{NET_IFACE:-none}})" >&2
  event exit ', "code": 1, "reason": "no address"'
  exit 1
fi
if ! PORT_BASE="$(reserve_ports "$HEAD_IP" {PORT_FIRST} {PORT_LAST} $(({PORT_FIRST} + (SLURM_JOB_ID % {PORT_SLOTS}) * 100)))"; then
  event exit ', "code": 1, "reason": "ports"'
  exit 1
fi
event ray_ports ", \\"node\\": \\"$HEAD_NODE\\", \\"ip\\": \\"$HEAD_IP\\", \\"base\\": $PORT_BASE"
RAY_ADDRESS_JOB="$HEAD_IP:$PORT_BASE"
export HEAD_IP PORT_BASE RAY_ADDRESS_JOB
{js.RAY_ENV}
RAY_AUTH_TOKEN="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')"
export RAY_AUTH_TOKEN
export RAY_CPUS="${{SLURM_CPUS_PER_TASK:-1}}"
srun --overlap --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" bash -c 'ray_node head' &
RAY_PIDS=($!)
declare -A WORKER_PID=()
for node in "${{NODES[@]:1}}"; do
  srun --overlap --nodes=1 --ntasks=1 --nodelist="$node" bash -c 'ray_node worker' &
  WORKER_PID[$node]=$!
  RAY_PIDS+=($!)
done

stop_ray() {{
  kill -TERM "${{RAY_PIDS[@]}}" 2>/dev/null
  wait "${{RAY_PIDS[@]}}" 2>/dev/null
}}

# (under `timeout`: ray.init can block past its own deadline when the head dies while starting)
if ! timeout "$((RAY_START_TIMEOUT + 30))" "$PY" -m launcher.backends.slurm.wait_ray "$RAY_ADDRESS_JOB" "$SLURM_JOB_NUM_NODES" "$RAY_START_TIMEOUT"; then
  event exit ', "code": 1, "reason": "ray"'
  stop_ray
  exit 1
fi
event ray_ready
"""
    return text.splitlines()


def _body_ray() -> list[str]:
    return [*_ray_node_functions(), *_node_exclusion(), *_ray_start()]


def _body_driver() -> list[str]:
    text = f"""\

# A Ray worker step that ended while the driver ran and no stop was asked for: its node was lost.
lost_nodes() {{
  local node
  for node in "${{!WORKER_PID[@]}}"; do
    kill -0 "${{WORKER_PID[$node]}}" 2>/dev/null && continue
    [ -e "$RUN_DIR/{STOP_FILE}" ] && continue
    grep -q "\\"node_failed\\", \\"job_id\\": \\"$SLURM_JOB_ID\\", \\"restart\\": $RESTART, .*\\"node\\": \\"$node\\"" "$EVENTS" \\
      || event node_failed ", \\"node\\": \\"$node\\""
    echo "$node"
  done
}}

# The driver runs on this (the first) node, in the background so that the batch shell can
# forward Slurm's warning signal (USR1, --signal=B:USR1@lead) and TERM to it.
"$PY" -m launcher run "$RECIPE_YAML" --run-dir "$RUN_DIR" --ray-address "$RAY_ADDRESS_JOB" &
DRIVER=$!
# Record a lost node at once: Slurm may end the whole job moments later (a node failure).
( while kill -0 "$DRIVER" 2>/dev/null; do lost_nodes >/dev/null; sleep 2; done ) &
WATCHER=$!
signalled() {{ event signal ", \\"signal\\": \\"$1\\""; }}
{js.forward_and_wait("signalled")}
event exit ", \\"code\\": $CODE"

kill "$WATCHER" 2>/dev/null
LOST=($(lost_nodes))
stop_ray

if [ "$CODE" -eq {EXIT_PREEMPTED} ] || {{ [ "$CODE" -ne 0 ] && [ "${{#LOST[@]}}" -gt 0 ]; }}; then
  STATE="$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null)"
  if [ -e "$SLURM_DIR/{CANCEL_FILE}" ]; then
    event cancelled
  elif [ "$RESTART" -ge "$MAX_RESTARTS" ]; then
    event gave_up ", \\"max_restarts\\": $MAX_RESTARTS"
  elif [ "$STATE" != RUNNING ] && [ -n "$STATE" ]; then
    event not_requeued ", \\"state\\": \\"$STATE\\""   # cancelled or ended by Slurm itself
  else
    event requeue
    requeue_excluding && exit 0
    event requeue_failed
  fi
fi
exit "$CODE"
"""
    return text.splitlines()
