"""`make demo` builds only what the demo needs: .venv, not SkyPilot's 460 MB venv."""

from __future__ import annotations

import os
import subprocess

from conftest import ROOT


def _dry(target: str) -> str:
    return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_demo_sets_up_without_skypilot_and_test_with_it():
    demo, test = _dry("demo"), _dry("test")
    assert "scripts/setup-env.sh" in demo and "--sky" not in demo
    assert "scripts/setup-env.sh --sky" in test


def test_setup_without_flag_builds_no_skypilot_venv(tmp_path):
    """With .venv up to date, the plain setup creates nothing else (a stale .venv is refreshed)."""
    sky = tmp_path / "venv-sky"
    env = {**os.environ, "SKY_VENV": str(sky)}
    subprocess.run(["bash", "scripts/setup-env.sh"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)
    assert not sky.exists()
