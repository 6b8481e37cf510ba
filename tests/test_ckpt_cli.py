"""`ckpt list`, `ckpt export` and `resume` on a run directory whose checkpoints lag behind its last
step, and on finished runs. The run directories are written here (metrics, summary, committed
step directories with manifests); nothing trains, and the export itself is replaced by a stub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_recipe_dict
from launcher.checkpoint.layout import checkpoints_dir, step_tag
from launcher.checkpoint.manifest import file_digest, write_manifest
from launcher.checkpoint.state import fingerprint
from launcher.cli import app
from launcher.errors import UserError
from launcher.recipe import from_dict, to_yaml

runner = CliRunner()


def fake_run(run_dir: Path, *, checkpoints: list[int], last: int, finished: bool, max_steps: int = 5) -> Path:
    """A run directory as `launcher run` leaves it: trained to step `last`, committed checkpoints
    at `checkpoints`, and summary.json when `finished`."""
    run_dir.mkdir(parents=True)
    recipe = from_dict(tiny_recipe_dict(train={"max_steps": max_steps, "micro_batch_size": 4, "lr": 1e-3}))
    (run_dir / "recipe.yaml").write_text(to_yaml(recipe))
    lines = [{"event": "start", "total_steps": max_steps}] + [{"step": s, "loss": 1.0 / s} for s in range(1, last + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"steps": last, "tokens": 100 * last}))
    for step in checkpoints:
        step_dir = checkpoints_dir(run_dir) / step_tag(step)
        step_dir.mkdir(parents=True)
        (step_dir / "rank-00000.json").write_text(json.dumps({"step": step}))
        write_manifest(step_dir, {"rank-00000.json": file_digest(step_dir / "rank-00000.json")},
                       {"fingerprint": fingerprint(recipe)})
        (checkpoints_dir(run_dir) / "latest").write_text(step_tag(step))
    return run_dir


@pytest.fixture
def no_training(monkeypatch):
    """Records what `resume` would train instead of starting Ray."""
    calls = []
    monkeypatch.setattr("launcher.cli.ckpt_cmds.run_and_report", lambda recipe, run_dir, **kw: calls.append(recipe))
    return calls


def test_list_says_how_far_the_newest_checkpoint_is_behind(tmp_path):
    run_dir = fake_run(tmp_path / "run", checkpoints=[2, 4], last=9, finished=True, max_steps=9)
    res = runner.invoke(app, ["ckpt", "list", str(run_dir), "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["step"]: r for r in json.loads(res.output)}
    assert rows[4]["resume_from"] and rows[4]["run_last_step"] == 9 and rows[4]["steps_after"] == 5
    assert rows[2]["steps_after"] == 7
    res = runner.invoke(app, ["ckpt", "list", str(run_dir)], terminal_width=200)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "the newest checkpoint is step 4; the run went on to step 9: 5 steps are not in any checkpoint" in text


def test_list_is_quiet_when_the_newest_checkpoint_is_the_last_step(tmp_path):
    run_dir = fake_run(tmp_path / "run", checkpoints=[5], last=5, finished=True)
    res = runner.invoke(app, ["ckpt", "list", str(run_dir)], terminal_width=200)
    assert res.exit_code == 0 and "not in any checkpoint" not in res.output
    assert json.loads(runner.invoke(app, ["ckpt", "list", str(run_dir), "--json"]).output)[0]["steps_after"] == 0


def test_list_counts_steps_of_a_killed_run_from_metrics(tmp_path):
    # no summary.json: killed after step 7, the last commit was step 3
    run_dir = fake_run(tmp_path / "run", checkpoints=[3], last=7, finished=False, max_steps=10)
    row = json.loads(runner.invoke(app, ["ckpt", "list", str(run_dir), "--json"]).output)[0]
    assert row["run_last_step"] == 7 and row["steps_after"] == 4


def test_export_says_which_steps_it_does_not_hold(tmp_path, monkeypatch):
    run_dir = fake_run(tmp_path / "run", checkpoints=[2, 4], last=9, finished=True, max_steps=9)
    exported = []

    def stub(step_dir, out, **kw):
        exported.append(Path(step_dir).name)
        return {"step_dir": str(step_dir), "params": 10, "dtype": "bf16", "files": ["a", "b"],
                "total_bytes": 20, "seconds": 0.1}

    monkeypatch.setattr("launcher.checkpoint.export.export_checkpoint", stub)
    res = runner.invoke(app, ["ckpt", "export", str(run_dir), "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert exported == [step_tag(4)] and summary["run_last_step"] == 9 and summary["steps_not_exported"] == 5
    res = runner.invoke(app, ["ckpt", "export", str(run_dir), "--out", str(tmp_path / "o")], terminal_width=200)
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "the run went on to step 9: 5 steps are not in any checkpoint" in text
    res = runner.invoke(app, ["ckpt", "export", str(run_dir), "--out", str(tmp_path / "o"), "--step", "2"],
                        terminal_width=200)
    assert "step 2 is exported; the run went on to step 9: 7 steps are not in it" in " ".join(res.output.split())


def test_resume_of_a_finished_run_says_so_and_trains_nothing(tmp_path, no_training):
    run_dir = fake_run(tmp_path / "run", checkpoints=[5], last=5, finished=True)
    res = runner.invoke(app, ["resume", str(run_dir)], terminal_width=300)
    assert res.exit_code == 0, res.output
    assert "already finished at step 5" in res.output and "train.max_steps=M with M > 5" in res.output
    assert no_training == []
    res = runner.invoke(app, ["resume", str(run_dir), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["finished"] is True and no_training == []


def test_resume_of_a_finished_run_without_checkpoint(tmp_path, no_training):
    run_dir = fake_run(tmp_path / "run", checkpoints=[], last=5, finished=True)
    res = runner.invoke(app, ["resume", str(run_dir)], terminal_width=300)
    assert res.exit_code == 0 and "already finished at step 5" in res.output and "no checkpoint" in res.output
    res = runner.invoke(app, ["resume", str(run_dir), "train.max_steps=8"])
    assert isinstance(res.exception, UserError) and "checkpoint.at_end=true" in str(res.exception)
    assert no_training == []


@pytest.mark.parametrize(
    ("checkpoints", "last", "finished", "overrides"),
    [
        ([5], 5, True, ["train.max_steps=8"]),  # train further
        ([2], 5, True, []),  # the newest checkpoint lacks steps 3-5: they are trained again
        ([3], 4, False, []),  # stopped early (preempted, killed)
    ],
)
def test_resume_trains_when_there_is_something_to_train(tmp_path, no_training, checkpoints, last, finished, overrides):
    run_dir = fake_run(tmp_path / "run", checkpoints=checkpoints, last=last, finished=finished)
    res = runner.invoke(app, ["resume", str(run_dir), *overrides])
    assert res.exit_code == 0, res.output
    assert len(no_training) == 1


def test_list_shows_whole_paths_in_a_narrow_terminal(tmp_path, monkeypatch):
    """A long run directory used to cut the path column to '…' in an 80-column terminal."""
    from launcher.cli.common import console

    run_dir = fake_run(tmp_path / ("a-rather-long-run-directory-name-" * 3), checkpoints=[4], last=4, finished=True)
    monkeypatch.setattr(type(console), "is_terminal", property(lambda self: True))
    monkeypatch.setattr(console, "width", 80)
    res = runner.invoke(app, ["ckpt", "list", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "…" not in res.output
    assert f"checkpoints/{step_tag(4)}" in res.output
    assert str(run_dir) in res.output.replace("\n", "")


def test_resume_of_a_finished_run_still_refuses_a_breaking_change(tmp_path, no_training):
    run_dir = fake_run(tmp_path / "run", checkpoints=[5], last=5, finished=True)
    res = runner.invoke(app, ["resume", str(run_dir), "data.max_seq_len=32"])
    assert isinstance(res.exception, UserError) and not no_training  # the CLI's exit 2
    assert "data.max_seq_len: 64 -> 32" in str(res.exception)
