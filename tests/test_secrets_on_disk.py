"""A value read through `${oc.env:...}` stays in memory: recipe.yaml, the W&B config, the
checkpoint fingerprint, the Slurm/SkyPilot job files and every log hold the reference instead."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, tiny_recipe_dict
from launcher.checkpoint.state import fingerprint
from launcher.cli.app import app
from launcher.errors import RecipeError, UserError
from launcher.recipe import env_variables, from_dict, load_recipe, to_dict, to_yaml
from test_skypilot_submit import SPOT, sky  # noqa: F401  (fixture)
from test_slurm_submit import PROFILE, slurm  # noqa: F401  (fixture)

VAR = "LAUNCHER_TEST_TOKEN"
REF = "${oc.env:" + VAR + "}"
TOKEN = "sk-fake-7f3a9c1e5b2d4f6a8c0e"

runner = CliRunner()


def _write(path: Path, **sections) -> Path:
    d = tiny_recipe_dict(**sections)
    d["logging"] = {"tensorboard": False, "wandb_entity": REF}  # a team name can be private
    d["sample"] = {"prompts": [f"tell {REF} a joke"], "max_new_tokens": 2}
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv(VAR, TOKEN)
    return TOKEN


def test_value_in_memory_reference_in_every_written_form(tmp_path, token):
    recipe = load_recipe(_write(tmp_path / "r.yaml"))
    assert recipe.logging.wandb_entity == token  # what the run uses
    assert recipe.sample.prompts == [f"tell {token} a joke"]
    for text in (to_yaml(recipe), json.dumps(to_dict(recipe)), json.dumps(fingerprint(recipe)), repr(recipe)):
        assert token not in text
    assert REF in repr(recipe)  # error messages and debug prints show the reference too
    assert yaml.safe_load(to_yaml(recipe))["logging"]["wandb_entity"] == REF
    assert to_dict(recipe)["sample"]["prompts"] == [f"tell {REF} a joke"]
    # what the driver ships to the workers resolves there again, and is written back the same way
    again = from_dict(to_dict(recipe))
    assert again.logging.wandb_entity == token and to_dict(again) == to_dict(recipe)
    assert env_variables(recipe) == [VAR]  # what every node that loads it needs set
    # --resolve (for the user's own terminal) shows the value
    assert to_dict(recipe, resolve=True)["logging"]["wandb_entity"] == token


def test_a_key_that_points_at_an_environment_value_is_written_as_the_reference(tmp_path, token):
    path = _write(tmp_path / "r.yaml")
    d = yaml.safe_load(path.read_text())
    d["data"]["hub_split"] = "${logging.wandb_entity}"
    path.write_text(yaml.safe_dump(d))
    recipe = load_recipe(path)
    assert recipe.data.hub_split == token
    assert to_dict(recipe)["data"]["hub_split"] == REF


def test_recipe_yaml_resolves_again_and_needs_the_variable(tmp_path, token, monkeypatch):
    written = tmp_path / "recipe.yaml"
    written.write_text(to_yaml(load_recipe(_write(tmp_path / "r.yaml"))))
    assert load_recipe(written).logging.wandb_entity == token  # a resume reads it back
    shipped = to_dict(load_recipe(written))
    monkeypatch.delenv(VAR)
    with pytest.raises(UserError, match=f"environment variable {VAR} is not set"):
        load_recipe(written)
    with pytest.raises(RecipeError, match=f"logging.wandb_entity.*{VAR} is not set"):
        from_dict(shipped)  # a worker on a node without the variable


def test_recipes_show_prints_the_reference(tmp_path, token):
    path = _write(tmp_path / "r.yaml")
    for extra in ([], ["--json"]):
        res = runner.invoke(app, ["recipes", "show", str(path), *extra])
        assert res.exit_code == 0, res.output
        assert REF in res.output and token not in res.output
    res = runner.invoke(app, ["recipes", "show", str(path), "--resolve"])  # asked for: the user's own terminal
    assert res.exit_code == 0 and token in res.stdout and REF not in res.stdout, res.output


def test_slurm_job_files_hold_the_reference(slurm, tmp_path, token):  # noqa: F811
    path = _write(tmp_path / "r.yaml", name="tiny", resources={"cpu_workers": 2})
    run_dir = str(tmp_path / "run")
    res = runner.invoke(app, ["submit", str(path), "--cluster", str(PROFILE), "--run-dir", run_dir])
    assert res.exit_code == 0, res.output
    assert REF in (tmp_path / "run" / "slurm" / "recipe.yaml").read_text()
    _assert_nowhere(token, tmp_path / "run", tmp_path / "state")


def test_skypilot_job_files_hold_the_reference(sky, tmp_path, token):  # noqa: F811
    gpus = {"nodes": 2, "gpus_per_node": 8, "gpu": "H100-80GB"}
    path = _write(tmp_path / "r.yaml", name="tiny", resources=gpus)
    run_dir = str(tmp_path / "run")
    res = runner.invoke(app, ["submit", str(path), "--cluster", str(SPOT), "--run-dir", run_dir])
    assert res.exit_code == 0, res.output
    assert REF in (tmp_path / "run" / "skypilot" / "recipe.yaml").read_text()
    _assert_nowhere(token, tmp_path / "run", tmp_path / "state")


def test_skypilot_passes_the_recipes_variables_as_secrets(tmp_path, token):
    """A node resolves ${oc.env:VAR} from its own environment: the task must carry VAR, as a
    secret (a name in the task file, the value only at launch)."""
    from launcher.backends.profile import load_profile
    from launcher.backends.skypilot.launch import plan

    gpus = {"nodes": 1, "gpus_per_node": 8, "gpu": "H100-80GB"}
    recipe = load_recipe(_write(tmp_path / "r.yaml", name="tiny", resources=gpus))
    sub = plan(recipe, load_profile(SPOT), run_dir=tmp_path / "run", environ={VAR: token, "HF_TOKEN": "x"})
    assert VAR in sub.task.secret_names and "HF_TOKEN" in sub.task.secret_names
    assert token not in sub.task.yaml


def _assert_nowhere(token: str, *roots: Path) -> None:
    """No file under `roots` holds `token`, as text or inside a binary (pickles, checkpoints)."""
    for root in roots:
        files = [p for p in root.rglob("*") if p.is_file()]
        assert files, f"nothing under {root} to search"
        found = [p for p in files if token.encode() in p.read_bytes()]
        assert not found, f"the secret was written to {found}"


FAKE_WANDB = '''
import json, os
def init(*, dir, config, **kw):
    with open(os.path.join(dir, "fake-wandb-config.json"), "w") as f:
        json.dump({"config": config, "entity": "<set>" if kw.get("entity") else None}, f)
    class Run:
        def log(self, *a, **k): pass
        def finish(self): pass
    return Run()
'''


@pytest.mark.slow
def test_a_run_writes_the_secret_nowhere(tmp_path):
    """One 2-step run on 1 CPU worker, W&B stood in by a module that records its config."""
    (tmp_path / "fake" / "wandb").mkdir(parents=True)
    (tmp_path / "fake" / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    path = _write(tmp_path / "r.yaml", train={"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3})
    d = yaml.safe_load(path.read_text())
    d["logging"]["wandb_project"] = "p"
    d["checkpoint"] = {"at_end": True}
    d["sample"] = {}  # generations print their prompt: that is output, not the recipe
    path.write_text(yaml.safe_dump(d))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths have a limit
    state = Path(os.environ["LAUNCHER_STATE_DIR"])
    python_path = os.pathsep.join(filter(None, [str(tmp_path / "fake"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, VAR: TOKEN, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": python_path}
    run_dir = tmp_path / "run"
    try:
        cmd = [sys.executable, "-m", "launcher", "run", str(path), "--run-dir", str(run_dir)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        assert TOKEN not in res.stdout + res.stderr
        cfg = json.loads((run_dir / "fake-wandb-config.json").read_text())
        assert cfg["entity"] == "<set>"  # the run had the value ...
        assert cfg["config"]["logging"]["wandb_entity"] == REF  # ... W&B got the reference
        assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["logging"]["wandb_entity"] == REF
        assert list(run_dir.glob("checkpoints/*/*")), "the run committed no checkpoint to search"
        _assert_nowhere(TOKEN, run_dir, state, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
