"""The CLI surface: verbs, help with examples, exit codes, JSON output. In-process, fast."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from conftest import RECIPES, ROOT
from launcher.cli.app import app

runner = CliRunner()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Through `python -m launcher`, as a user runs it (exit codes and stderr included)."""
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_verbs_are_stable():
    import typer.main

    root = typer.main.get_command(app)
    assert {"run", "plot", "recipes"} <= set(root.commands)
    assert {"validate", "show", "docs"} <= set(root.commands["recipes"].commands)


def test_verb_modules_do_not_import_the_root_app():
    """The verbs register in launcher/cli/app.py; a verb module importing it back (the old
    registration by import at the bottom of app.py) is a circular import."""
    import ast

    for path in sorted((ROOT / "launcher" / "cli").glob("*.py")):
        if path.name in ("app.py", "__init__.py"):
            continue
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "launcher.cli.app" not in imported, path.name
    root = typer.main.get_command(app)
    assert list(root.commands) == [
        "run", "plot", "resume", "estimate", "submit", "status", "logs", "cancel", "recipes", "ckpt", "data"
    ]
    assert list(root.commands["ckpt"].commands) == ["list", "verify", "export"]


@pytest.mark.parametrize("verb", [["run"], ["plot"], ["recipes", "validate"], ["recipes", "show"], ["recipes", "docs"],
                                  ["data", "prepare"]])
def test_every_verb_has_help_with_an_example(verb):
    res = runner.invoke(app, [*verb, "--help"])
    assert res.exit_code == 0
    assert "Example: launcher" in res.output


def test_typo_in_override_exits_2_and_starts_nothing(tmp_path):
    run_dir = tmp_path / "r"
    res = run_cli("run", str(RECIPES / "examples/tiny-sft.yaml"), "train.max_step=5", "--run-dir", str(run_dir))
    assert res.returncode == 2
    assert "train.max_step" in res.stderr and "did you mean 'max_steps'" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not run_dir.exists()


def test_zero3_with_pipeline_is_refused(tmp_path):
    res = run_cli("run", str(RECIPES / "examples/tiny-sft.yaml"), "parallelism.pipeline_stages=2", "--run-dir", str(tmp_path / "r"))
    assert res.returncode == 2
    assert "ZeRO 0 or 1" in res.stderr
    assert not (tmp_path / "r").exists()


def test_missing_recipe_file():
    res = run_cli("recipes", "show", "no/such/recipe.yaml")
    assert res.returncode == 2 and "recipe file not found" in res.stderr


def test_validate_reports_each_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "examples/tiny-sft.yaml").read_text().replace("max_steps", "max_stepz"))
    res = runner.invoke(app, ["recipes", "validate", str(RECIPES / "examples"), str(bad), "--json"])
    assert res.exit_code == 2
    rows = json.loads(res.output)
    assert {r["path"].split("/")[-1]: r["ok"] for r in rows} == {
        "tiny-dpo.yaml": True, "tiny-lora.yaml": True, "tiny-mix.yaml": True, "tiny-pretrain.yaml": True,
        "tiny-sft.yaml": True, "bad.yaml": False}
    assert "did you mean 'max_steps'" in [r for r in rows if not r["ok"]][0]["error"]


def test_show_applies_overrides_as_json():
    res = runner.invoke(app, ["recipes", "show", str(RECIPES / "examples/tiny-sft.yaml"), "train.lr=0.01", "--json"])
    assert res.exit_code == 0
    data = json.loads(res.output)
    assert data["train"]["lr"] == 0.01
    assert data["parallelism"]["zero_stage"] == 3
    assert data["checkpoint"]["keep_last"] == 2  # defaults are filled in


def test_run_refuses_to_clobber_a_finished_run_without_checkpoints(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "summary.json").write_text('{"steps": 1}\n')
    res = run_cli("run", str(RECIPES / "examples/tiny-sft.yaml"), "--run-dir", str(tmp_path))
    assert res.returncode == 2 and "already holds a finished run" in res.stderr and "--no-resume" in res.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_plot_writes_png(tmp_path):
    lines = [{"event": "start", "total_steps": 3}] + [{"step": i, "loss": 3.0 / i} for i in (1, 2, 3)]
    lines.append({"step": 3, "eval": True, "eval_loss": 1.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = runner.invoke(app, ["plot", str(tmp_path)])
    assert res.exit_code == 0
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_plot_without_metrics_is_a_user_error(tmp_path):
    res = run_cli("plot", str(tmp_path))
    assert res.returncode == 2 and "no training steps" in res.stderr
