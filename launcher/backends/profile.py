"""Cluster profiles: where and how a recipe runs (`launcher submit RECIPE --cluster FILE`).

A profile is one YAML file, validated as strictly as a recipe: unknown keys fail with a
did-you-mean, wrong types name the key. The docstring under each field is its documentation
(docs/slurm.md walks through an example).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

from launcher.errors import RecipeError, UserError
from launcher.recipe.convert import build

if TYPE_CHECKING:
    from launcher.backends.skypilot.profile import SkyPilotProfile

# Values that become `#SBATCH` directives are read by sbatch, not by a shell, and cannot be quoted
# reliably there; they are restricted to characters Slurm names actually use (no whitespace,
# quotes, `#`, `$`, backticks, `;` or newlines).
_DIRECTIVE = re.compile(r"[A-Za-z0-9_.,:=+@%/&|!*()\[\]-]+")
_TIME = re.compile(r"(\d+-)?\d{1,3}(:\d{2}){0,2}|\d+-\d{1,2}")
_MEM = re.compile(r"\d+[KMGT]?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
"""Environment variable names treated as secrets: they pass through the submitting environment
and are never written into a profile, a job script, a run directory or a log."""


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise RecipeError(key, message)


def check_common(usd_per_gpu_hour: float | None, setup: list[str], env: dict[str, str], *,
                 secret_fix: str, reserved: tuple[str, ...] = (), reserved_by: str = "",
                 node_memory_gb: float | None = None) -> None:
    """Checks every backend's profile makes of its price, host RAM, setup lines and environment:
    each setup line splits into words, and no env entry is a secret (those come from the caller's
    environment) or a reserved name."""
    if usd_per_gpu_hour is not None:
        _require(usd_per_gpu_hour >= 0, "usd_per_gpu_hour", "must be 0 or more")
    if node_memory_gb is not None:
        _require(not isinstance(node_memory_gb, bool) and node_memory_gb > 0, "node_memory_gb",
                 "host RAM of each node in GiB, more than 0, e.g. 2048")
    for i, line in enumerate(setup):
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise RecipeError(f"setup[{i}]", f"cannot split into words ({e})") from None
        _require(bool(words), f"setup[{i}]", "empty command")
    for name, value in env.items():
        _require(bool(_ENV_NAME.fullmatch(str(name))), f"env.{name}", "not a valid variable name")
        _require(not SECRET_NAME.search(str(name)), f"env.{name}", f"looks like a secret: {secret_fix}")
        if reserved:
            _require(not str(name).startswith(reserved), f"env.{name}",
                     f"{' and '.join(p + '*' for p in reserved)} are set by {reserved_by}")
        _require(isinstance(value, str), f"env.{name}", f"expected a string, got {value!r}")


def _directive(value: str | None, key: str, example: str) -> None:
    if value is not None:
        _require(
            bool(_DIRECTIVE.fullmatch(value)),
            key,
            f"use letters, digits and Slurm's punctuation only (no spaces, quotes, '$', ';' or newlines), "
            f"e.g. {example}",
        )


@dataclass(kw_only=True, slots=True)
class ClusterProfile:
    """A cluster a recipe can be submitted to."""

    backend: Literal["slurm"]
    """The scheduler: `slurm` (sbatch with one task per node, Ray on the allocation)."""

    runs_root: str
    """Directory on the shared filesystem (seen by every node and by the submitting host) under
    which each submitted run gets its run directory `<runs_root>/<run-id>`. A relative path is
    taken from the directory `launcher submit` runs in."""

    partition: str | None = None
    """Slurm partition (`--partition`). Empty: the cluster's default partition."""

    account: str | None = None
    """Slurm account charged for the job (`--account`)."""

    qos: str | None = None
    """Slurm quality of service (`--qos`)."""

    time_limit: str = "24:00:00"
    """Wall-clock limit per allocation (`--time`), as Slurm writes it: `MM`, `HH:MM:SS` or
    `D-HH:MM:SS`. A preempted or time-limited run requeues and resumes in a new allocation."""

    gpus_per_node: int = 0
    """GPUs in each node. A recipe may use up to this many per node (`resources.gpus_per_node`)."""

    gres: str = "gpu"
    """GRES name GPUs are requested under: `--gres=<gres>:<recipe's gpus_per_node>`, e.g. `gpu`
    or `gpu:h100` where the cluster types its GPUs."""

    gpu: str | None = None
    """GPU model of the nodes for the estimator, e.g. `H100-80GB` (the recipe's `resources.gpu`
    wins when set)."""

    cpus_per_node: int | None = None
    """CPU cores to ask for on each node (`--cpus-per-task`, one task per node); Ray is told the
    same number. Empty: what the recipe's workers need (`cpus_per_worker` per worker)."""

    mem_per_node: str | None = None
    """Memory per node (`--mem`), e.g. `480G`; `0` asks for all of it. Empty: the cluster's default."""

    constraint: str | None = None
    """Node features required (`--constraint`), e.g. `h100&ib`."""

    exclusive: bool = False
    """Ask for whole nodes (`--exclusive`)."""

    setup: list[str] = field(default_factory=list)
    """Commands run in the job before anything else, on the first node, and inherited by the Ray
    processes on every node: `module load cuda/12.4`, `source /shared/venvs/llm/bin/activate`.
    Each line is ONE command and its arguments, split as a shell splits words but never
    interpreted: no `;`, pipes, `$VAR` or `$(...)`. Put anything more in a script on the shared
    filesystem and `source` it."""

    env: dict[str, str] = field(default_factory=dict)
    """Environment variables exported in the job, e.g. `{NCCL_DEBUG: WARN}`. Values are literal
    (no `$VAR` expansion). Secrets (tokens, keys, passwords) do not belong here: export them
    where you run `launcher submit`; the job inherits them without writing them anywhere."""

    python: str | None = None
    """Python interpreter on the nodes that has `launcher` installed, e.g.
    `/shared/venvs/llm/bin/python`, or `python` to take the one on PATH after `setup`. Empty: the
    interpreter running `launcher submit` (right when its virtual environment is on the shared
    filesystem)."""

    network_interface: str | None = None
    """Network interface whose IPv4 address Ray binds to on each node, e.g. `ib0` or `eth0`.
    Empty: the node's first address (`hostname -I`)."""

    preempt_signal_lead_s: int = 120
    """Seconds before the time limit that Slurm warns the job (`--signal=B:USR1@<lead>`); the
    run checkpoints, exits and requeues itself. Allow the time one checkpoint takes, plus margin."""

    max_restarts: int = 20
    """Requeues after which a run that keeps being preempted stops requeueing itself."""

    ray_start_timeout_s: int = 300
    """How long the job waits for every node to join the Ray cluster before it fails."""

    exclude_node_after: int = 2
    """A node whose Ray step died under a run this many times (over its restarts) is excluded
    from the run's next allocations (`scontrol update ExcNodeList`). 0: never exclude."""

    secrets_file: str | None = None
    """A file of `NAME=value` lines (e.g. `~/.config/launcher/secrets.env`, mode 600, on the
    shared filesystem) that the job reads at its start, on the first node: how secrets such as
    `HF_TOKEN` reach a Slurm job. They are not handed to sbatch, since slurmctld stores a job's
    environment; the values are taken literally and never written anywhere."""

    usd_per_gpu_hour: float | None = None
    """On-prem cost of one GPU-hour in dollars, for the estimator and the run registry."""

    node_memory_gb: float | None = None
    """Host RAM of each node in GiB, for the estimator: optimizer states and parameters offloaded
    to the CPU (`parallelism.offload_*`) must fit in it. Empty: `mem_per_node` when it names a
    size, else the usual RAM of machines with the GPU type (e.g. 2048 for 8x H100)."""

    def host_memory_gib(self) -> float | None:
        """Host RAM per node for the estimator: `node_memory_gb`, else `mem_per_node` (Slurm's
        units: K, M (the default), G, T, binary), else None (`0` asks for all of an unknown size)."""
        if self.node_memory_gb is not None:
            return float(self.node_memory_gb)
        if not self.mem_per_node or self.mem_per_node == "0":
            return None
        unit = self.mem_per_node[-1] if self.mem_per_node[-1].isalpha() else "M"
        number = float(self.mem_per_node.rstrip("KMGT"))
        return number * {"K": 2**-20, "M": 2**-10, "G": 1, "T": 1024}[unit]

    def __post_init__(self) -> None:
        _require(bool(self.runs_root.strip()), "runs_root", "set a directory on the shared filesystem")
        _require("\n" not in self.runs_root and "\0" not in self.runs_root, "runs_root", "no newlines")
        _directive(self.partition, "partition", "gpu")
        _directive(self.account, "account", "ml-team")
        _directive(self.qos, "qos", "normal")
        _directive(self.constraint, "constraint", "h100&ib")
        _directive(self.gres, "gres", "gpu or gpu:h100")
        _require(
            bool(_TIME.fullmatch(self.time_limit)),
            "time_limit",
            "write it as Slurm does: MM, HH:MM:SS or D-HH:MM:SS, e.g. 24:00:00",
        )
        _require(self.gpus_per_node >= 0, "gpus_per_node", "must be 0 or more")
        if self.cpus_per_node is not None:
            _require(self.cpus_per_node >= 1, "cpus_per_node", "must be at least 1")
        if self.mem_per_node is not None:
            _require(bool(_MEM.fullmatch(self.mem_per_node)), "mem_per_node", "e.g. 480G, 512000M or 0")
        _require(
            10 <= self.preempt_signal_lead_s <= 65535,
            "preempt_signal_lead_s",
            "must be 10 to 65535 seconds, e.g. 120",
        )
        _require(self.max_restarts >= 0, "max_restarts", "must be 0 or more")
        _require(self.ray_start_timeout_s >= 10, "ray_start_timeout_s", "must be at least 10")
        _require(self.exclude_node_after >= 0, "exclude_node_after", "must be 0 (never) or more, e.g. 2")
        if self.secrets_file is not None:
            _require(bool(self.secrets_file.strip()) and "\n" not in self.secrets_file, "secrets_file",
                     "a path, e.g. ~/.config/launcher/secrets.env")
        check_common(
            self.usd_per_gpu_hour, self.setup, self.env, node_memory_gb=self.node_memory_gb,
            secret_fix="export it where you run `launcher submit` instead; the job inherits it and it "
            "is never written to the script or the run directory",
        )


BACKENDS = ("slurm", "skypilot")


def profile_from_dict(data: dict, source: str | None = None) -> "ClusterProfile | SkyPilotProfile":
    """A Slurm profile (`ClusterProfile`) or, with `backend: skypilot`, a `SkyPilotProfile`."""
    try:
        if isinstance(data, dict) and isinstance(data.get("env"), dict):
            data = {**data, "env": {k: _env_value(k, v) for k, v in data["env"].items()}}
        if isinstance(data, dict) and data.get("backend") == "skypilot":
            from launcher.backends.skypilot.profile import SkyPilotProfile

            return build(SkyPilotProfile, data, "")
        if isinstance(data, dict) and "backend" in data and data["backend"] not in BACKENDS:
            raise RecipeError(
                "backend", f"must be one of {', '.join(repr(b) for b in BACKENDS)}, got {data['backend']!r}"
            )
        return build(ClusterProfile, data, "")
    except RecipeError as e:
        raise e.with_source(source) if source else e


def _env_value(key: str, value: object) -> object:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return value  # rejected with the key named by the check above
    return str(value) if isinstance(value, (int, float)) else value


def load_profile(path: str | Path) -> "ClusterProfile | SkyPilotProfile":
    """Read and validate a cluster profile; a mistake is a UserError naming the file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: cluster profile not found (see cluster/example-slurm.yaml, cluster/example-skypilot.yaml)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read cluster profile ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a cluster profile is a mapping of keys, e.g. 'backend: slurm'")
    return profile_from_dict(data, str(path))

