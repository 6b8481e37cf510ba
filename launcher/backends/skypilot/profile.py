"""The `backend: skypilot` cluster profile: which GPUs, on which clouds and regions, spot or
on-demand, and which bucket holds the checkpoints (docs/skypilot.md walks through an example).

Validated as strictly as a recipe (unknown keys get a did-you-mean; every message names the key
and the fix). Values are restricted to the characters their kind uses, and every value that reaches
a shell is quoted again when the task is rendered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from launcher.errors import RecipeError
from launcher.recipe.convert import did_you_mean

CLOUDS = ("aws", "gcp", "azure", "lambda", "nebius", "runpod", "oci", "kubernetes", "paperspace", "fluidstack",
          "cudo", "vast", "do", "ibm")
"""Cloud names SkyPilot knows (lower case, as `sky check` prints them)."""

PREEMPT_WINDOW_S = {"aws": 120, "gcp": 30, "azure": 30}
"""Seconds between a spot notice and the hard stop, by cloud; 30 where a cloud does not say."""

_ACCEL = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*):([1-9][0-9]?)")
_REGION = re.compile(r"[a-z0-9][a-z0-9-]*")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+-]*")
_SECRET_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BUCKET_NAME = r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]"
_PREFIX = r"(/[A-Za-z0-9._=+@-]+)*/?"
_BUCKETS = {
    "s3": re.compile(rf"s3://{_BUCKET_NAME}{_PREFIX}"),
    "gs": re.compile(rf"gs://{_BUCKET_NAME}{_PREFIX}"),
    "r2": re.compile(rf"r2://{_BUCKET_NAME}{_PREFIX}"),
    "azure": re.compile(rf"https://[a-z0-9]{{3,24}}\.blob\.core\.windows\.net/[a-z0-9-]{{3,63}}{_PREFIX}"),
}
STORES = {"s3": "s3", "gs": "gcs", "r2": "r2", "azure": "azure"}
"""Bucket URI scheme -> SkyPilot's `store` name."""


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise RecipeError(key, message)


def bucket_kind(uri: str) -> str | None:
    """`s3`, `gs`, `r2` or `azure` for a well-formed checkpoint bucket URI, else None."""
    for kind, pattern in _BUCKETS.items():
        if pattern.fullmatch(uri):
            return kind
    return None


@dataclass(kw_only=True, slots=True)
class SkyPilotProfile:
    """Cloud GPUs through SkyPilot: one task per run, Ray across its nodes, checkpoints in a bucket."""

    backend: Literal["skypilot"]
    """`skypilot`: SkyPilot finds the GPUs (`sky.launch`, or a managed job with `use_spot`)."""

    accelerators: str
    """GPUs of each node as SkyPilot names them: `H100:8`, `A100-80GB:8`, `L4:1`. The recipe's
    `resources.gpus_per_node` may not exceed the count; `resources.nodes` becomes `num_nodes`."""

    checkpoint_bucket: str
    """Bucket (and optional prefix) holding the run's checkpoints, mounted on every node at the run
    directory's `checkpoints/`: `s3://bucket/prefix`, `gs://bucket/prefix`, `r2://bucket/prefix`,
    or `https://<account>.blob.core.windows.net/<container>/prefix` (Azure). Each run writes under
    `<bucket>/<run-id>/`. The bucket must exist; SkyPilot's credentials must be able to write it."""

    checkpoint_mount_mode: Literal["MOUNT_CACHED", "MOUNT", "COPY"] = "MOUNT_CACHED"
    """How the bucket is mounted: `MOUNT_CACHED` (writes go to local disk and are uploaded in the
    background: fast saves; SkyPilot's advice for checkpoints) or `MOUNT` (every write goes
    straight to the bucket). `COPY` is refused: it downloads once and never uploads, so the
    run's checkpoints would be lost with the node."""

    clouds: list[str] = field(default_factory=list)
    """Clouds SkyPilot may choose from, e.g. `[aws, gcp]`. Empty: every cloud `sky check` enabled."""

    regions: dict[str, list[str]] = field(default_factory=dict)
    """Allowed regions per cloud, e.g. `{aws: [us-east-1, us-west-2], gcp: [us-central1]}`. A cloud
    in `clouds` without an entry may use any of its regions."""

    use_spot: bool = False
    """Spot instances, run as a SkyPilot managed job (`sky.jobs.launch`): SkyPilot notices a
    preemption, finds new instances and restarts the task, which resumes from the bucket's latest
    committed checkpoint. Off: on-demand, one `sky.launch` cluster torn down when the run ends."""

    job_recovery: Literal["EAGER_NEXT_REGION", "FAILOVER"] = "EAGER_NEXT_REGION"
    """Managed jobs: where SkyPilot looks after a preemption. `EAGER_NEXT_REGION` moves on to
    another region at once (spot capacity rarely returns fast); `FAILOVER` retries the same
    region first."""

    max_restarts_on_errors: int = 3
    """Managed jobs: restarts after the task itself fails (not preemptions, which are always
    recovered; not exit code 75, the launcher's "stopped for a preemption, resume me")."""

    disk_size: int = 512
    """Boot disk per node in GB: the environment, the model cache and MOUNT_CACHED's upload queue
    (at least one checkpoint's shards per node)."""

    image: str | None = None
    """Machine or container image (`image_id`), e.g. `docker:pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel`
    or an AMI id. Empty: SkyPilot's default image for the cloud (CUDA drivers, conda)."""

    runs_root: str = "~/launcher-runs"
    """Directory on each node under which the run directory `<runs_root>/<run-id>` lives (`~` is
    the node's home). Only `checkpoints/` in it is the bucket; logs and metrics of the node live
    and die with it."""

    python: str = "python3"
    """Interpreter on the node used to create the run's virtual environment (`~/.launcher-venv`)."""

    setup: list[str] = field(default_factory=list)
    """Commands run on every node before the project is installed: `sudo apt-get install -y
    libaio-dev`. Each line is ONE command and its arguments, split as a shell splits words but never
    interpreted: no `;`, pipes, `$VAR` or `$(...)`."""

    env: dict[str, str] = field(default_factory=dict)
    """Environment variables of the task (SkyPilot's `envs:`), e.g. `{NCCL_DEBUG: WARN}`. Values are
    literal. Secrets do not belong here: list their names in `secrets`."""

    secrets: list[str] = field(default_factory=lambda: ["HF_TOKEN", "WANDB_API_KEY"])
    """Names of environment variables passed to the task as SkyPilot `secrets:`: their values are
    read from your environment when you run `launcher submit` (those not set are left out) and are
    never written to the task file, the run directory or the logs."""

    ray_start_timeout_s: int = 600
    """How long rank 0 waits for every node to join the run's Ray cluster before it fails."""

    usd_per_gpu_hour: float | None = None
    """Price of one GPU-hour for `launcher status`'s spend. Empty: the estimator's cheapest price
    for the accelerator on the profile's clouds (spot or on-demand as `use_spot` says)."""

    node_memory_gb: float | None = None
    """Host RAM per node in GiB, for the estimator's offload check. Empty: the RAM of the price
    table's instances with these accelerators (the smallest, since the cloud may pick any)."""

    def __post_init__(self) -> None:
        _require(
            bool(_ACCEL.fullmatch(self.accelerators)),
            "accelerators",
            "write the GPU name and the count per node as SkyPilot does, e.g. H100:8 or A100-80GB:8",
        )
        kind = bucket_kind(self.checkpoint_bucket)
        _require(
            kind is not None,
            "checkpoint_bucket",
            "use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, r2://BUCKET/PREFIX or "
            "https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX (lower-case bucket names; letters, "
            "digits and ._=+@- in the prefix)",
        )
        _require(
            self.checkpoint_mount_mode != "COPY",
            "checkpoint_mount_mode",
            "COPY downloads the bucket once and never uploads: the checkpoints a run writes would be "
            "lost with the node. Use MOUNT_CACHED (or MOUNT)",
        )
        for i, cloud in enumerate(self.clouds):
            _require(cloud in CLOUDS, f"clouds[{i}]",
                     f"unknown cloud {cloud!r}; " + did_you_mean(str(cloud), list(CLOUDS), f"one of {', '.join(CLOUDS)}"))
        _require(len(set(self.clouds)) == len(self.clouds), "clouds", "a cloud is listed twice")
        for cloud, regions in self.regions.items():
            _require(
                cloud in self.clouds,
                f"regions.{cloud}",
                f"add {cloud!r} to `clouds`, or remove its regions" if cloud in CLOUDS else
                f"unknown cloud {cloud!r}; one of {', '.join(self.clouds) or 'the clouds you list in `clouds`'}",
            )
            _require(bool(regions), f"regions.{cloud}", "list at least one region, or remove the entry")
            for j, region in enumerate(regions):
                _require(
                    bool(_REGION.fullmatch(region)),
                    f"regions.{cloud}[{j}]",
                    "a region name as the cloud writes it, e.g. us-east-1 or us-central1",
                )
        _require(self.max_restarts_on_errors >= 0, "max_restarts_on_errors", "must be 0 or more")
        _require(50 <= self.disk_size <= 65536, "disk_size", "GB per node, 50 to 65536, e.g. 512")
        if self.image is not None:
            _require(
                bool(_IMAGE.fullmatch(self.image)),
                "image",
                "an image id without spaces or shell characters, e.g. docker:pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel",
            )
        _require(
            bool(re.fullmatch(r"(~/)?[A-Za-z0-9_./-]+", self.runs_root)) and ".." not in self.runs_root.split("/")
            and (self.runs_root.startswith("/") or self.runs_root.startswith("~/")),
            "runs_root",
            "an absolute path or one under ~/, of letters, digits and _./- only, e.g. ~/launcher-runs",
        )
        _require(bool(self.python.strip()) and "\n" not in self.python, "python", "e.g. python3 or /opt/conda/bin/python")
        _require(self.ray_start_timeout_s >= 10, "ray_start_timeout_s", "must be at least 10")
        from launcher.backends.profile import check_common

        check_common(
            self.usd_per_gpu_hour, self.setup, self.env, reserved=("SKYPILOT_", "LAUNCHER_"),
            node_memory_gb=self.node_memory_gb,
            reserved_by="SkyPilot and the launcher",
            secret_fix="list its name under `secrets` and export it where you run `launcher submit`; "
            "it is then passed as a SkyPilot secret and written nowhere",
        )
        for i, name in enumerate(self.secrets):
            _require(bool(_SECRET_VAR.fullmatch(name)), f"secrets[{i}]", "an environment variable name, e.g. HF_TOKEN")
            _require(name not in self.env, f"secrets[{i}]", f"{name} is also in `env`: keep it in one place")

    @property
    def accelerator(self) -> str:
        """The GPU name: `H100` of `H100:8`."""
        return self.accelerators.rsplit(":", 1)[0]

    @property
    def gpus_per_node(self) -> int:
        return int(self.accelerators.rsplit(":", 1)[1])

    @property
    def bucket_store(self) -> str:
        """SkyPilot's `store` for the bucket: s3, gcs, r2 or azure."""
        return STORES[bucket_kind(self.checkpoint_bucket) or "s3"]

    def infra(self) -> list[str]:
        """SkyPilot `infra` strings the task may run on: `aws/us-east-1`, `gcp`, ... (empty: any)."""
        out = []
        for cloud in self.clouds:
            out += [f"{cloud}/{r}" for r in self.regions.get(cloud, [])] or [cloud]
        return out
