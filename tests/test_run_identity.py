"""W&B ids: one per run directory, the same on every resume, the job's registry id when it has one."""

from __future__ import annotations

import sys
import threading
import types

import pytest

from launcher.runtime.run_identity import WANDB_ID_FILE, wandb_run_id


def test_two_runs_of_one_recipe_get_different_ids(tmp_path):
    a, b = tmp_path / "tiny-sft-1", tmp_path / "tiny-sft-2"
    a.mkdir()
    b.mkdir()
    assert wandb_run_id(a, env={}) != wandb_run_id(b, env={})


def test_a_resume_reuses_the_stored_id(tmp_path):
    first = wandb_run_id(tmp_path, env={})
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == first
    assert wandb_run_id(tmp_path, env={}) == first
    # a resume started by a job (LAUNCHER_RUN_ID set) keeps the run's id too
    assert wandb_run_id(tmp_path, env={"LAUNCHER_RUN_ID": "tiny-sft-20260101-abcd"}) == first
    assert [p.name for p in tmp_path.iterdir()] == [WANDB_ID_FILE]  # no temporary file left


def test_a_job_run_uses_its_registry_id(tmp_path):
    env = {"LAUNCHER_RUN_ID": "tiny-sft-20260101-abcd"}
    assert wandb_run_id(tmp_path, env=env) == "tiny-sft-20260101-abcd"
    # the same job on a fresh node (no run directory yet) gets the same id
    fresh = tmp_path / "fresh-node"
    fresh.mkdir()
    assert wandb_run_id(fresh, env=env) == "tiny-sft-20260101-abcd"
    # characters W&B refuses in an id are replaced
    odd = tmp_path / "odd"
    odd.mkdir()
    assert wandb_run_id(odd, env={"LAUNCHER_RUN_ID": "team/run:1"}) == "team-run-1"


def test_concurrent_first_starts_agree(tmp_path):
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(wandb_run_id(tmp_path, env={}))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == ids[0]


def test_an_empty_id_file_is_replaced(tmp_path):
    (tmp_path / WANDB_ID_FILE).write_text("")
    got = wandb_run_id(tmp_path, env={})
    assert got and wandb_run_id(tmp_path, env={}) == got


def test_metrics_writer_gives_wandb_the_run_directory_id(tmp_path, monkeypatch):
    """Two local runs of one recipe (same run_name, no LAUNCHER_RUN_ID) reach W&B as two runs."""
    from launcher.recipe.sections import LoggingConfig
    from launcher.runtime.metrics import MetricsWriter

    calls: list[dict] = []

    class FakeRun:
        def finish(self) -> None:
            pass

    def init(**kw):
        calls.append(kw)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("LAUNCHER_RUN_ID", raising=False)
    cfg = LoggingConfig(tensorboard=False, wandb_project="p")
    for name in ("a", "b", "a"):
        (tmp_path / name).mkdir(exist_ok=True)
        MetricsWriter(tmp_path / name, cfg, run_name="tiny-sft", recipe={}).close()
    ids = [c["id"] for c in calls]
    assert ids[0] != ids[1] and ids[2] == ids[0] == wandb_run_id(tmp_path / "a")
