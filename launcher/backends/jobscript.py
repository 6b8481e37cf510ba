"""The pieces the Slurm and SkyPilot job scripts share: quoting, setup lines, the fit check, Ray's
environment and start commands, and the loop that forwards signals to the driver.

Both scripts are rendered by pure functions (`slurm/render.py`, `skypilot/render.py`, checked by
golden files); what they have in common is written once, here, so that a fix (a port, a quoting
rule, a signal) reaches both.
"""

from __future__ import annotations

import shlex

from launcher.checkpoint.preempt import STOP_FILE
from launcher.errors import UserError
from launcher.recipe.sections import Recipe

RAY_MODULE = "ray.scripts.scripts"
"""`python -m ray.scripts.scripts start ...`: the interpreter that has launcher (and Ray) installed,
not whatever `ray` is first on PATH."""


def q(value: object) -> str:
    """One shell word for `value`, never interpreted."""
    return shlex.quote(str(value))


def setup_lines(lines: list[str]) -> list[str]:
    """The profile's setup lines: one command each, every word quoted (`;`, `$VAR`, pipes and
    backticks stay literal text); a comment first, nothing when there are none."""
    if not lines:
        return []
    return ["# Setup lines of the cluster profile (one command each, arguments quoted)."] + [
        " ".join(q(w) for w in shlex.split(line)) for line in lines
    ]


def check_gpus_fit(recipe: Recipe, gpus_per_node: int, where: str) -> None:
    """The recipe's GPUs per node must exist on the profile's nodes (`where` names them)."""
    r = recipe.resources
    if r.gpus_per_node > gpus_per_node:
        raise UserError(
            f"the recipe asks for {r.gpus_per_node} GPUs per node (resources.gpus_per_node) but "
            f"{where} have {gpus_per_node}"
        )


RAY_ENV = """\
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED=0"""
"""Ray's token authentication (the token itself comes from the job: random per allocation on
Slurm, a secret on SkyPilot; Ray without auth is remote code execution, CVE-2023-48022)."""


def ray_ports(base: str) -> str:
    """A bash array RAY_PORTS of Ray's per-node ports from the block starting at `base` (a shell
    expression): daemons at base+1..+7, workers from base+10 to the end of the block
    (`launcher.backends.ports.block_size`, in RAY_PORT_BLOCK)."""
    b = base
    return f"""\
RAY_PORTS=(
  --node-manager-port=$(({b} + 1)) --object-manager-port=$(({b} + 2))
  --ray-client-server-port=$(({b} + 3)) --dashboard-agent-grpc-port=$(({b} + 4))
  --dashboard-agent-listen-port=$(({b} + 5)) --metrics-export-port=$(({b} + 6))
  --runtime-env-agent-port=$(({b} + 7))
  --min-worker-port=$(({b} + 10)) --max-worker-port=$(({b} + RAY_PORT_BLOCK - 1))
)"""


RESERVE_PORTS = """\
# reserve_ports IP FIRST LAST PREFERRED: a block of RAY_PORT_BLOCK free ports on this node,
# locked for this shell's lifetime (launcher.backends.ports); prints its first port.
reserve_ports() {
  "$PY" -m launcher.backends.ports "$1" "$$" "$RAY_PORT_BLOCK" "$2" "$3" "$4"
}"""


def ray_start(kind: str, gcs_port: str, address: str = "$RAY_ADDRESS_JOB") -> str:
    """The words of `ray start` for a head or a worker (without --node-ip-address): blocking, no
    dashboard, no usage stats, `$RAY_CPUS` CPUs, the ports of RAY_PORTS."""
    common = '--disable-usage-stats --num-cpus="$RAY_CPUS" "${RAY_PORTS[@]}"'
    if kind == "head":
        return f'"$PY" -m {RAY_MODULE} start --head --block --port={gcs_port} --include-dashboard=false {common}'
    return f'"$PY" -m {RAY_MODULE} start --address="{address}" --block {common}'


def join_until(start: str, indent: str = "") -> str:
    """Run a worker's blocking `ray start` (`start`, the full command) until it joins: it fails
    at once when the head's GCS is up but the head node has not registered in it yet (a loaded
    machine, a slow head), so it is retried until `$deadline` (SECONDS). Ends the caller's shell."""
    return "\n".join(indent + line for line in f"""\
while :; do
  {start} && exit 0
  [ "$SECONDS" -lt "$deadline" ] || {{ echo "launcher: Ray did not join $RAY_ADDRESS_JOB in time" >&2; exit 1; }}
  echo "launcher: Ray could not join $RAY_ADDRESS_JOB yet; retrying" >&2
  sleep 3
done""".splitlines())


def forward_and_wait(on_signal: str = "") -> str:
    """Run-time heart of both scripts: the driver ($DRIVER) runs in the background; USR1 and TERM
    reaching the script are forwarded to it (`on_signal SIG` is called first when given), and the
    script waits again after each, so the driver's own exit code ends up in CODE.

    TERM is forwarded only when the driver has not seen one itself: Slurm (scancel, preemption,
    a node failure) and a shutting-down VM send TERM to every process, and a second TERM tells
    the driver to stop at once without saving. The driver's stop request ($RUN_DIR/.stop,
    launcher.checkpoint.preempt) shows that it has."""
    hook = f'{on_signal} "$1"; ' if on_signal else ""
    return f"""\
forward() {{
  {hook}if [ "$1" = TERM ]; then
    for _ in 1 2 3 4; do [ -e "$RUN_DIR/{STOP_FILE}" ] && return; sleep 0.5; done
  fi
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
trap - USR1 TERM"""


def export_window(seconds: str) -> str:
    """LAUNCHER_PREEMPT_WINDOW_S for the driver: how long a save may take after a warning
    (launcher.checkpoint.preempt reads it; without it the window falls back to 30 s)."""
    return f'export LAUNCHER_PREEMPT_WINDOW_S="{seconds}"'
