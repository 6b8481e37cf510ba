"""The one seam through which the SkyPilot backend talks to SkyPilot (its Python SDK). Tests
replace `CLIENT` with a recorder; nothing else in the launcher imports `sky`.

SkyPilot (0.10 and later) runs an API server: SDK calls return a request id, and `sky.get`
(or `sky.stream_and_get`, which also prints the request's log) waits for the result. Every call
here waits. SkyPilot's exceptions become UserErrors with SkyPilot's own message.

Tasks cross the seam as the rendered task config (a dict, as in the task YAML) plus the secret
values, which are handed to SkyPilot as `secrets_overrides` and never written anywhere.
"""

from __future__ import annotations

from typing import Any, Protocol

from launcher.errors import UserError

INSTALL_HINT = (
    "SkyPilot is not installed here: pip install 'skypilot[aws]' (or [gcp], [azure], ...) in an environment "
    "with launcher, then `sky check` (docs/skypilot.md)"
)


class Client(Protocol):
    def launch(self, config: dict[str, Any], secrets: dict[str, str], *, cluster_name: str) -> str:
        """Provision a cluster and run the task on it, tearing it down when the task ends; the
        cluster's job id."""

    def jobs_launch(self, config: dict[str, Any], secrets: dict[str, str], *, name: str) -> str:
        """Launch the task as a managed job (SkyPilot recovers preemptions); its job id."""

    def job_status(self, cluster_name: str, job_id: str) -> dict[str, Any] | None:
        """{status, started_at, ended_at} of a job on a cluster, or None when the cluster is gone."""

    def managed_job_status(self, job_id: str) -> dict[str, Any] | None:
        """{status, recovery_count, started_at, ended_at, duration_s} of a managed job (SkyPilot's
        `job_duration`: seconds it ran, without the time spent recovering)."""

    def tail_logs(self, cluster_name: str | None, job_id: str, *, follow: bool) -> int:
        """Print a job's log (a managed job when `cluster_name` is None); its exit code."""

    def cancel(self, cluster_name: str, job_id: str) -> None:
        """Cancel a job on a cluster and tear the cluster down."""

    def jobs_cancel(self, job_id: str) -> None:
        """Cancel a managed job (SkyPilot tears its cluster down)."""


def _sky() -> Any:
    try:
        import sky
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return sky


def _status_name(value: Any) -> str:
    """`ManagedJobStatus.RUNNING` / `JobStatus.RUNNING` / "RUNNING" -> "RUNNING"."""
    return str(getattr(value, "value", value) or "").split(".")[-1].upper()


def _field(record: Any, name: str) -> Any:
    if isinstance(record, dict):
        return record.get(name)
    return getattr(record, name, None)


class SkyPilotSDK:
    """The real client: the installed SkyPilot's SDK."""

    def _task(self, config: dict[str, Any], secrets: dict[str, str]) -> Any:
        sky = _sky()
        try:
            return sky.Task.from_yaml_config(dict(config), secrets_overrides=list(secrets.items()))
        except Exception as e:
            raise UserError(f"SkyPilot refused the task: {e}") from None

    def _call(self, what: str, fn: Any, *args: Any, stream: bool = False, **kwargs: Any) -> Any:
        sky = _sky()
        try:
            request = fn(*args, **kwargs)
            return sky.stream_and_get(request) if stream else sky.get(request)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"SkyPilot {what} failed: {type(e).__name__}: {e}") from None

    def launch(self, config: dict[str, Any], secrets: dict[str, str], *, cluster_name: str) -> str:
        sky = _sky()
        task = self._task(config, secrets)
        job_id, _handle = self._call("launch", sky.launch, task, cluster_name=cluster_name, down=True, stream=True)
        if job_id is None:
            raise UserError(f"SkyPilot launched {cluster_name} but returned no job id")
        return str(job_id)

    def jobs_launch(self, config: dict[str, Any], secrets: dict[str, str], *, name: str) -> str:
        sky = _sky()
        task = self._task(config, secrets)
        job_ids, _handle = self._call("jobs launch", sky.jobs.launch, task, name=name, stream=True)
        if not job_ids:
            raise UserError(f"SkyPilot accepted managed job {name} but returned no job id")
        return str(job_ids[0] if isinstance(job_ids, (list, tuple)) else job_ids)

    def job_status(self, cluster_name: str, job_id: str) -> dict[str, Any] | None:
        sky = _sky()
        clusters = self._call("status", sky.status, [cluster_name])
        if not clusters:
            return None
        jobs = self._call("queue", sky.queue, cluster_name)
        for j in jobs or []:
            if str(_field(j, "job_id")) == str(job_id):
                return {"status": _status_name(_field(j, "status")), "started_at": _field(j, "start_at"),
                        "ended_at": _field(j, "end_at")}
        return {"status": "PENDING", "started_at": None, "ended_at": None}

    def managed_job_status(self, job_id: str) -> dict[str, Any] | None:
        sky = _sky()
        result = self._call("jobs queue", sky.jobs.queue_v2, refresh=False, job_ids=[int(job_id)])
        records = result[0] if isinstance(result, tuple) else result
        for j in records or []:
            if str(_field(j, "job_id")) == str(job_id):
                return {"status": _status_name(_field(j, "status")),
                        "recovery_count": int(_field(j, "recovery_count") or 0),
                        "started_at": _field(j, "submitted_at"),
                        "ended_at": _field(j, "end_at"), "duration_s": _field(j, "job_duration")}
        return None

    def tail_logs(self, cluster_name: str | None, job_id: str, *, follow: bool) -> int:
        sky = _sky()
        try:
            if cluster_name is None:
                code = sky.jobs.tail_logs(job_id=int(job_id), follow=follow)
            else:
                code = sky.tail_logs(cluster_name, int(job_id), follow)
        except Exception as e:
            raise UserError(f"SkyPilot logs failed: {type(e).__name__}: {e}") from None
        return int(code or 0)

    def cancel(self, cluster_name: str, job_id: str) -> None:
        sky = _sky()
        self._call("cancel", sky.cancel, cluster_name, job_ids=[int(job_id)])
        self._call("down", sky.down, cluster_name)

    def jobs_cancel(self, job_id: str) -> None:
        sky = _sky()
        self._call("jobs cancel", sky.jobs.cancel, job_ids=[int(job_id)])


CLIENT: Client = SkyPilotSDK()
"""Replaced in tests by a recorder."""
