"""The run registry (SQLite) and local runs in it."""

from __future__ import annotations

import pytest
import typer

from conftest import tiny_recipe_dict
from launcher.errors import EXIT_PREEMPTED, UserError
from launcher.recipe import from_dict
from launcher.runs import Registry, RunRecord, default_db_path, track_local_run


@pytest.fixture
def reg(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_STATE_DIR", str(tmp_path / "state"))
    return Registry()


def test_state_dir_is_overridable(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_STATE_DIR", str(tmp_path / "s"))
    assert default_db_path() == tmp_path / "s" / "runs.db"
    monkeypatch.delenv("LAUNCHER_STATE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert default_db_path() == tmp_path / "home" / ".local" / "state" / "launcher" / "runs.db"


def test_add_update_history_find(reg, tmp_path):
    reg.add(RunRecord(run_id="a-1", name="a", backend="slurm", run_dir=str(tmp_path / "a"), job_ids=["7"], submitted_at=1.0))
    reg.add(RunRecord(run_id="b-1", name="b", backend="local", run_dir=str(tmp_path / "b"), submitted_at=2.0))
    run = reg.update("a-1", status="running", restarts=1, job_ids=["7", "9"])
    assert run.status == "running" and run.job_ids == ["7", "9"] and run.restarts == 1
    reg.update("a-1", status="running")  # unchanged status: no new history line
    reg.update("a-1", status="completed", detail="done")
    assert [h["status"] for h in reg.history("a-1")] == ["pending", "running", "completed"]
    assert [r.run_id for r in reg.list()] == ["b-1", "a-1"]
    assert reg.find("a").run_id == "a-1"  # unique prefix
    assert reg.find(str(tmp_path / "b")).run_id == "b-1"  # run directory
    with pytest.raises(UserError, match="no run 'zzz'"):
        reg.find("zzz")
    with pytest.raises(ValueError):
        reg.update("a-1", status="exploded")
    # a second process sees the same data
    assert Registry(reg.path).get("a-1").status == "completed"


def test_prefix_with_like_wildcards_is_literal(reg, tmp_path):
    reg.add(RunRecord(run_id="x_1", name="x", backend="local", run_dir="/d1"))
    reg.add(RunRecord(run_id="xy1", name="x", backend="local", run_dir="/d2"))
    assert reg.find("x_").run_id == "x_1"


def _recipe():
    return from_dict(tiny_recipe_dict(name="loc"))


def test_local_run_completed(reg, tmp_path):
    with track_local_run(_recipe(), tmp_path / "r1", recipe_path="x.yaml") as run:
        assert reg.get(run.run_id).status == "running"
    run = reg.get("r1")
    assert run.status == "completed" and run.backend == "local" and run.exit_code == 0 and run.ended_at


@pytest.mark.parametrize(
    "exc, status, code",
    [
        (typer.Exit(EXIT_PREEMPTED), "preempted", EXIT_PREEMPTED),
        (SystemExit(EXIT_PREEMPTED), "preempted", EXIT_PREEMPTED),
        (typer.Exit(1), "failed", 1),
        (RuntimeError("boom"), "failed", 1),
        (KeyboardInterrupt(), "cancelled", 130),
        (typer.Exit(0), "completed", 0),
    ],
)
def test_local_run_outcomes(reg, tmp_path, exc, status, code):
    with pytest.raises(type(exc)):
        with track_local_run(_recipe(), tmp_path / "r"):
            raise exc
    run = reg.get("r")
    assert (run.status, run.exit_code) == (status, code)


def test_resumed_local_run_keeps_its_row_and_counts_a_restart(reg, tmp_path):
    with pytest.raises(typer.Exit):
        with track_local_run(_recipe(), tmp_path / "r"):
            (tmp_path / "r" / "checkpoints").mkdir(parents=True)
            (tmp_path / "r" / "checkpoints" / "latest").write_text("step-00000005\n")
            raise typer.Exit(EXIT_PREEMPTED)
    assert reg.get("r").latest_checkpoint == "step-00000005"
    with track_local_run(_recipe(), tmp_path / "r"):
        pass
    runs = reg.list()
    assert len(runs) == 1 and runs[0].restarts == 1 and runs[0].status == "completed"
    assert [h["status"] for h in reg.history("r")] == ["running", "preempted", "running", "completed"]


def test_registry_trouble_never_stops_a_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LAUNCHER_STATE_DIR", str(tmp_path / "file" / "sub"))  # cannot be created
    with track_local_run(_recipe(), tmp_path / "r") as run:
        assert run is None
    assert "run registry not updated" in capsys.readouterr().err


def test_runs_inside_a_cluster_job_are_left_to_the_backend(reg, tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_BACKEND", "slurm")
    with track_local_run(_recipe(), tmp_path / "r") as run:
        assert run is None
    assert reg.list() == []
