"""`--json` prints JSON alone on stdout, for every verb that has the option.

Each verb runs as a user runs it: `python -m launcher` in a subprocess, with the interpreter that
runs the tests, offline (hub offline, proxies pointing at a closed port, so any network attempt
fails at once). `make test` runs this file in .venv and again in .venv-sky (the verbs that need a
trained run there only), where SkyPilot is
installed and prints "Failed to fetch catalog" lines on stdout when it cannot reach its catalog:
with LAUNCHER_REQUIRE_SKYPILOT=1 a missing SkyPilot is a failure there, not a skip.

A new verb with `--json` fails `test_every_json_verb_is_checked` until it has a case here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RECIPES, ROOT

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, connections fail at once
TINY = RECIPES / "examples" / "tiny-sft.yaml"
BIG = RECIPES / "sft" / "llama-3.1-8b-full-sft.yaml"


def _sky_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("sky") is not None


def offline_env(state_dir: Path) -> dict[str, str]:
    dropped = ("LAUNCHER_OFFLINE_PRICES", "NO_PROXY", "no_proxy")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HTTP_PROXY=CLOSED, HTTPS_PROXY=CLOSED, http_proxy=CLOSED, https_proxy=CLOSED,
               LAUNCHER_STATE_DIR=str(state_dir), LAUNCHER_LIVE_PRICES_TIMEOUT_S="10",
               COLUMNS="80")  # a narrow terminal must not wrap JSON either
    return env


def cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def json_alone(res: subprocess.CompletedProcess, codes: tuple[int, ...] = (0,)):
    """stdout parses as one JSON document with nothing around it (json.loads refuses extra text)."""
    assert res.returncode in codes, (
        f"exit {res.returncode}\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}")
    try:
        return json.loads(res.stdout)
    except ValueError as e:
        pytest.fail(f"stdout is not JSON alone ({e}):\n{res.stdout[:3000]}")


def test_skypilot_is_installed_where_required():
    if os.environ.get("LAUNCHER_REQUIRE_SKYPILOT") != "1":
        pytest.skip("LAUNCHER_REQUIRE_SKYPILOT=1 (make test, in .venv-sky) requires SkyPilot here")
    import sky  # noqa: F401  (the purity checks below are meant to run where SkyPilot can print)


# --- which verbs have --json ---------------------------------------------------------------------

def json_verbs() -> set[tuple[str, ...]]:
    import typer.main

    from launcher.cli.app import app

    found = set()

    def walk(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, (*path, name))
        if any("--json" in getattr(p, "opts", ()) for p in cmd.params):
            found.add(path)

    walk(typer.main.get_command(app), ())
    return found


def _bad_recipe(tmp: Path) -> str:
    bad = tmp / "bad.yaml"
    bad.write_text(TINY.read_text().replace("max_steps: 400", "max_step: 400"))
    return str(bad)


# verb -> cases: (arguments given a temporary directory, exit codes accepted)
FAST = {
    ("estimate",): [
        (lambda t: ["estimate", str(BIG), "--json"], (0,)),
        (lambda t: ["estimate", "--model", "meta-llama/Llama-3.1-70B", "--gpu", "A100-80GB", "--json"], (0,)),
    ],
    ("recipes", "validate"): [(lambda t: ["recipes", "validate", str(TINY), _bad_recipe(t), "--json"], (2,))],
    ("recipes", "show"): [(lambda t: ["recipes", "show", str(TINY), "train.lr=0.01", "--json"], (0,))],
    ("submit",): [
        (lambda t: ["submit", str(BIG), "--cluster", str(ROOT / "cluster" / "example-skypilot.yaml"),
                    "--dry-run", "--json"], (0,)),
        (lambda t: ["submit", str(BIG), "--cluster", str(ROOT / "cluster" / "example-slurm.yaml"),
                    "--dry-run", "--run-dir", str(t / "slurm-run"), "--json"], (0,)),
    ],
    ("status",): [(lambda t: ["status", "--json"], (0,))],
    ("data", "prepare"): [(lambda t: ["data", "prepare", str(TINY), "data.synthetic.num_examples=200",
                                      f"data.cache_dir={t / 'data-cache'}", "--json"], (0,))],
}
# verbs that need a trained run: one tiny run (slow) serves them all
AFTER_A_RUN = [("run",), ("resume",), ("ckpt", "list"), ("ckpt", "verify"), ("ckpt", "export")]


def test_every_json_verb_is_checked():
    assert json_verbs() == set(FAST) | set(AFTER_A_RUN), "add the new --json verb's case to this file"


@pytest.mark.parametrize("verb", sorted(FAST), ids=" ".join)
def test_json_alone_on_stdout(verb, tmp_path):
    for i, (args, codes) in enumerate(FAST[verb]):
        res = cli(args(tmp_path), offline_env(tmp_path / f"state{i}"))
        data = json_alone(res, codes)
        assert data not in (None, "", [], {}) or verb == ("status",)


def test_live_prices_keep_stdout_json(tmp_path):
    """With SkyPilot installed and offline, --live-prices waits at most its timeout and prints
    only JSON (SkyPilot's catalog failures stay off stdout)."""
    if not _sky_installed():
        pytest.skip("SkyPilot is not installed here (.venv-sky has it)")
    env = offline_env(tmp_path / "state") | {"LAUNCHER_LIVE_PRICES_TIMEOUT_S": "5"}
    data = json_alone(cli(["estimate", str(BIG), "--json", "--live-prices"], env))
    assert data["costs"] and data["prices_source"]
    assert "Failed to fetch" not in json.dumps(data["costs"])


# --- verbs that need a trained run ---------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run of the tiny recipe with a checkpoint at the end, through `run --json`. Where
    SkyPilot is installed only (make test's .venv-sky run): the same run in .venv too would add
    minutes to the suite and check nothing more, since SkyPilot is what could print on stdout."""
    if not _sky_installed():
        pytest.skip("runs where SkyPilot is installed: make test runs this file in .venv-sky")
    tmp = tmp_path_factory.mktemp("json-run")
    env = offline_env(tmp / "state")
    run_dir = tmp / "run"
    res = cli(["run", str(TINY), "train.max_steps=2", "train.eval_every=0", "sample.from_eval=0",
               "data.synthetic.num_examples=200", "logging.tensorboard=false", "checkpoint.at_end=true",
               "--run-dir", str(run_dir), "--json"], env, timeout=600)
    return tmp, env, run_dir, res


@pytest.mark.slow
@pytest.mark.parametrize("verb", AFTER_A_RUN, ids=" ".join)
def test_json_alone_after_a_run(verb, trained):
    tmp, env, run_dir, run_res = trained
    summary = json_alone(run_res)  # `run --json` itself
    assert summary
    if verb == ("run",):
        status = json_alone(cli(["status", "--json"], env))
        assert len(status) == 1
        return
    args = {
        ("resume",): ["resume", str(run_dir), "--json"],  # finished: says so, as JSON
        ("ckpt", "list"): ["ckpt", "list", str(run_dir), "--json"],
        ("ckpt", "verify"): ["ckpt", "verify", str(run_dir), "--json"],
        ("ckpt", "export"): ["ckpt", "export", str(run_dir), "--out", str(tmp / "hf"), "--json"],
    }[verb]
    data = json_alone(cli(args, env))
    assert data
