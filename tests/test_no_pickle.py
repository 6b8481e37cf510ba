"""No verb that reads a checkpoint unpickles code. An attacker with write access to a run
directory plants a crafted pickle in a committed checkpoint and rewrites the manifest's size and
checksum to match; then resume (through `train()`), `ckpt verify`, `ckpt export` and the reshard
reader each refuse the file or ignore it, and the code in it never runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_recipe_dict
from launcher.checkpoint.hashing import digest_file
from launcher.checkpoint.layout import checkpoints_dir, step_tag
from launcher.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_spawn import train_ranks  # noqa: E402

runner = CliRunner()
OPTIM = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _recipe(steps: int) -> dict:
    return tiny_recipe_dict(parallelism={"zero_stage": 2}, resources={"cpu_workers": 2},
                            train={"max_steps": steps, "micro_batch_size": 4, "lr": 1e-3},
                            checkpoint={"every_steps": 1, "keep_last": 2}, sample={"from_eval": 0})


def plant(step_dir: Path, marker: Path) -> None:
    """Replace rank 1's optimizer file with a crafted pickle and make the manifest agree."""
    evil = step_dir / OPTIM
    torch.save({"optimizer_state_dict": _RunsCode(marker), "ds_version": "0.19.8"}, evil)
    doc = json.loads((step_dir / "manifest.json").read_text())
    doc["files"][OPTIM] = digest_file(evil)
    (step_dir / "manifest.json").write_text(json.dumps(doc, indent=1) + "\n")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 2-rank ZeRO-2 run with commits at steps 1 and 2; step 2 carries the crafted pickle."""
    run_dir = tmp_path_factory.mktemp("no-pickle") / "run"
    train_ranks(_recipe(2), run_dir, world=2)
    (run_dir / "recipe.yaml").write_text(_recipe_yaml())
    marker = run_dir.parent / "code-ran"
    plant(checkpoints_dir(run_dir) / step_tag(2), marker)
    return run_dir, marker


def _recipe_yaml() -> str:
    from launcher.recipe import from_dict, to_yaml

    return to_yaml(from_dict(_recipe(2)))


@pytest.mark.slow
def test_no_verb_runs_a_planted_pickle(planted, tmp_path):
    from launcher.cli import app

    run_dir, marker = planted
    step2 = checkpoints_dir(run_dir) / step_tag(2)

    # ckpt verify reads bytes only: the manifest was rewritten to match, so it passes, harmlessly
    res = runner.invoke(app, ["ckpt", "verify", str(run_dir), "--step", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["ok"] and not marker.exists()

    # ckpt export refuses the file, naming it and the global it references (a UserError: the
    # CLI's main turns it into one line and exit 2)
    res = runner.invoke(app, ["ckpt", "export", str(run_dir), "--out", str(tmp_path / "hf")])
    assert isinstance(res.exception, UserError), res.output
    assert OPTIM in str(res.exception) and "posix.system" in str(res.exception)
    assert not marker.exists() and not (tmp_path / "hf").exists()

    # the reshard reads the shards through the same reader
    from launcher.checkpoint.zero_reader import iter_full_optimizer_states

    with pytest.raises(UserError, match="refused"):
        next(iter_full_optimizer_states(step2))
    assert not marker.exists()

    # DeepSpeed's own loader, given the launcher's checkpoint engine (same-layout resume)
    from launcher.checkpoint.ds_engine import LauncherCheckpointEngine

    with pytest.raises(UserError, match="refused"):
        LauncherCheckpointEngine().load(str(step2 / OPTIM))
    assert not marker.exists()

    # resume through train(): the newest commit is refused before any rank loads it, and the
    # previous one, which passes a full verify, is resumed instead
    train_ranks(_recipe(3), run_dir, world=2)
    assert not marker.exists()
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [1]
    assert [e["step"] for e in events if "loss" in e and not e.get("eval")] == [1, 2, 3]
    log = (run_dir / "spawn-rank-0.log").read_text()
    assert "step-00000002 cannot be loaded" in log and "posix.system" in log


@pytest.mark.slow
def test_resume_refuses_when_every_commit_is_planted(planted, tmp_path):
    import shutil

    run_dir, _ = planted
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    marker = tmp_path / "code-ran"
    for step_dir in checkpoints_dir(copy).glob("step-*"):
        plant(step_dir, marker)
    with pytest.raises(RuntimeError, match="refused to load"):
        train_ranks(_recipe(5), copy, world=2)
    assert not marker.exists()
