"""The README's and getting-started's commands in a directory with nothing beside it, as in a
fresh clone (CI and users have no `../shared`). The commands and the getting-started recipe are
read from the documents themselves, so the documents and this test cannot drift apart."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RECIPES, ROOT
from launcher.recipe.load import resolve

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

CHEAP = (("recipes", "validate"), ("recipes", "show"), ("estimate",), ("submit",), ("status",))
"""Documented commands that start no training (`submit` runs with --dry-run only)."""


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def commands(path: Path) -> list[list[str]]:
    """Every `launcher ...` command in the bash blocks of `path`, as argument lists (comments
    dropped, continuation lines joined, `a && b` split)."""
    out = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cmd = words[: words.index("&&")] if "&&" in words else words
                words = words[len(cmd) + 1:]
                if cmd and cmd[0] == "launcher":
                    out.append(cmd[1:])
    return out


def launcher(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def clone(tmp_path):
    """What a clone holds for the documented commands, and no `../shared` beside it."""
    where = tmp_path / "launcher"
    where.mkdir()
    for name in ("recipes", "cluster", "docs"):
        shutil.copytree(ROOT / name, where / name)
    shutil.copy(ROOT / "README.md", where)
    assert not (where.parent / "shared").exists()
    return where


def test_no_recipe_reads_outside_the_repository():
    for path in sorted(RECIPES.rglob("*.yaml")):
        assert "../" not in path.read_text(), f"{path} names a path outside the repository"
        data = resolve(path)
        for key in ("path", "eval_path"):
            for p in data.get("data", {}).get(key) or []:
                assert not Path(p).is_absolute() and not p.startswith(".."), f"{path}: data.{key}: {p}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_documented_command_reads_outside_the_repository(doc):
    for cmd in commands(doc):
        assert not any("../" in word or word.startswith("/") for word in cmd), f"{doc.name}: launcher {shlex.join(cmd)}"


def test_readme_and_getting_started_have_commands():
    assert len(commands(ROOT / "README.md")) >= 10 and len(commands(ROOT / "docs" / "getting-started.md")) >= 4


def test_cheap_documented_commands_run_in_a_fresh_clone(clone):
    ran = []
    for cmd in commands(ROOT / "README.md"):
        if not any(tuple(cmd[: len(verb)]) == verb for verb in CHEAP) or "my-sft.yaml" in " ".join(cmd):
            continue
        if cmd[0] == "submit":
            assert "--dry-run" in cmd, "a documented submit without --dry-run would need a cluster"
        res = launcher(cmd, clone)
        assert res.returncode == 0, f"launcher {shlex.join(cmd)}:\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
        assert "Traceback" not in res.stderr
        ran.append(cmd[0])
    assert {"recipes", "estimate", "submit", "status"} <= set(ran)


def getting_started_recipe() -> tuple[str, str]:
    """The recipe of getting-started section 3: (its path, from its first comment line; the YAML)."""
    for block in blocks(ROOT / "docs" / "getting-started.md", "yaml"):
        first = block.splitlines()[0]
        if first.startswith("# recipes/"):
            return first[2:].strip(), block
    raise AssertionError("docs/getting-started.md has no ```yaml block starting with '# recipes/...'")


def write_getting_started(clone: Path) -> tuple[Path, list[list[str]]]:
    """The documented recipe and a small data file where it says, and the documented commands
    that use the recipe."""
    name, text = getting_started_recipe()
    (clone / name).write_text(text)
    data = resolve(clone / name)["data"]
    assert data["format"] == "sharegpt", "the rows below are ShareGPT conversations"
    rows = [{"conversations": [{"from": "human", "value": f"Say {w} twice."}, {"from": "gpt", "value": f"{w} {w}"}]}
            for w in ("cat", "dog", "sun", "moon", "tree", "rain", "fish", "bird") * 4]
    for p in data["path"]:
        (clone / p).parent.mkdir(parents=True, exist_ok=True)
        (clone / p).write_text(json.dumps(rows))
    cmds = [c for c in commands(ROOT / "docs" / "getting-started.md") if name in c]
    return clone / name, cmds


def test_getting_started_recipe_validates_as_written(clone):
    _, cmds = write_getting_started(clone)
    checks = [c for c in cmds if c[0] == "recipes"]
    assert [c[1] for c in checks] == ["validate", "show"]
    for cmd in checks:
        res = launcher(cmd, clone)
        assert res.returncode == 0, res.stdout + res.stderr
    shown = launcher(["recipes", "show", *checks[1][2:], "--json"], clone)
    data = json.loads(shown.stdout)["data"]
    assert data["path"] == ["data/conversations.json"] and data["hub"] is None  # the base's hub is replaced


def test_documented_error_is_what_the_user_gets(clone):
    write_getting_started(clone)
    for doc in DOCS:
        for block in blocks(doc, ""):
            lines = block.splitlines()
            if not (lines and lines[0].startswith("$ launcher ") and lines[1].startswith("error: ")):
                continue
            res = launcher(shlex.split(lines[0][2:])[1:], clone)
            shown = lines[1].removesuffix("...").rstrip()
            assert res.returncode == 2 and res.stderr.startswith(shown), (doc.name, res.stderr)


@pytest.mark.slow
def test_getting_started_small_run_as_documented(clone):
    """The "before renting GPUs" command, exactly as written, trains and checkpoints."""
    recipe, cmds = write_getting_started(clone)
    (run,) = [c for c in cmds if c[0] == "run"]
    res = launcher(run, clone, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_dir = clone / run[run.index("--run-dir") + 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 5 and (run_dir / "checkpoints" / "step-00000005" / "manifest.json").is_file()


@pytest.mark.slow
def test_tiny_pretrain_then_the_checkpoint_verbs_in_a_fresh_clone(clone):
    """The README's pretraining example (shortened), then plot, ckpt list/verify/export and resume."""
    (cmd,) = [c for c in commands(ROOT / "README.md") if c[:2] == ["run", "recipes/examples/tiny-pretrain.yaml"]]
    run_dir = clone / "runs" / "pre"
    res = launcher([*cmd, "train.max_steps=6", "train.eval_every=3", "--run-dir", str(run_dir)], clone, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 6
    for verb in (["plot"], ["ckpt", "list"], ["ckpt", "verify"]):
        res = launcher([*verb, str(run_dir)], clone)
        assert res.returncode == 0, (verb, res.stdout + res.stderr)
    assert (run_dir / "loss.png").is_file()
    res = launcher(["ckpt", "export", str(run_dir), "--out", str(clone / "hf"), "--json"], clone, timeout=300)
    assert res.returncode == 0 and json.loads(res.stdout)["steps_not_exported"] == 0, res.stdout + res.stderr
    res = launcher(["resume", str(run_dir)], clone)
    assert res.returncode == 0 and "already finished at step 6" in res.stdout, res.stdout + res.stderr
    # the same `launcher run` again: the run is finished, so nothing starts (no Ray, no workers)
    res = launcher([*cmd, "train.max_steps=6", "train.eval_every=3", "--run-dir", str(run_dir)], clone, timeout=300)
    text = " ".join((res.stdout + res.stderr).split())
    assert res.returncode == 0 and "already finished at step 6" in text, text[-3000:]
    assert "starting Ray" not in text and "done 6 steps" in text, text[-3000:]
