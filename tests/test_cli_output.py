"""What a person reads: user text is never parsed as rich markup, commands stay on one line, and
mistakes that still run (missing secrets, more CPU workers than cores) are said out loud."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from launcher.errors import UserError


def test_error_message_keeps_brackets(monkeypatch, capsys):
    """pip extras such as skypilot[aws] used to vanish: rich read '[aws]' as a style tag."""
    import launcher.cli as cli

    def boom() -> None:
        raise UserError("SkyPilot is not installed here: pip install 'skypilot[aws]' (or [gcp])")

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "pip install 'skypilot[aws]' (or [gcp])" in err


def test_long_command_is_not_wrapped(monkeypatch, tmp_path):
    """A command printed for copying stays on one line even in a narrow terminal."""
    from launcher.cli.common import console

    monkeypatch.setattr(console, "width", 40)
    path = tmp_path / ("a-long-run-directory-name-" * 3)
    with console.capture() as cap:
        console.print(f"metrics: {path}   plot: launcher plot {path}", highlight=False, markup=False)
    assert f"launcher plot {path}" in cap.get()


_SKY = "backend: skypilot\naccelerators: H100:8\nclouds: [aws]\nuse_spot: true\ncheckpoint_bucket: s3://my-bucket/runs\n"


def _profile(tmp_path, secrets: list[str]):
    from launcher.backends.profile import load_profile

    p = tmp_path / "sky.yaml"
    p.write_text(_SKY + f"secrets: {secrets}\n")
    return load_profile(p)


def test_missing_secret_is_named(tmp_path):
    from launcher.backends.skypilot.launch import missing_secrets

    prof = _profile(tmp_path, ["HF_TOKEN", "WANDB_API_KEY"])
    assert missing_secrets(prof, {"HF_TOKEN": "x"}) == ["WANDB_API_KEY"]
    assert missing_secrets(prof, {"HF_TOKEN": "x", "WANDB_API_KEY": "y"}) == []


def test_submit_dry_run_warns_about_missing_secret_on_stderr(tmp_path):
    prof = tmp_path / "sky.yaml"
    prof.write_text(_SKY + "secrets: [LAUNCHER_TEST_SECRET_NOT_SET]\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "LAUNCHER_TEST_SECRET_NOT_SET"}
    res = subprocess.run(
        [sys.executable, "-m", "launcher", "submit", "recipes/sft/llama-3.1-8b-full-sft.yaml", "--cluster", str(prof),
         "--dry-run", "--json"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "LAUNCHER_TEST_SECRET_NOT_SET" in res.stderr and "not set" in res.stderr
    import json

    json.loads(res.stdout)  # the warning stays off the JSON


def test_more_cpu_workers_than_cores_is_said(monkeypatch):
    from conftest import tiny_recipe_dict
    from launcher.cli.common import _oversubscribed
    from launcher.recipe.load import from_dict

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    many = from_dict(tiny_recipe_dict(resources={"cpu_workers": 16}))
    msg = _oversubscribed(many, None)
    assert msg and "16 cores" in msg and "has 2" in msg and "resources.cpu_workers=2" in msg
    assert _oversubscribed(from_dict(tiny_recipe_dict(resources={"cpu_workers": 2})), None) is None
    assert _oversubscribed(many, "10.0.0.1:6379") is None  # a cluster's cores are not this machine's


def test_only_rays_token_enabled_notice_is_dropped():
    """Ray's notice that it turned token auth on interrupted the progress bar on every start; its
    warning that auth is off must still reach the user."""
    import logging

    from launcher.runtime.driver import _quiet_default_token_notice

    _quiet_default_token_notice()
    _quiet_default_token_notice()  # idempotent: one filter
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep()
    log.addHandler(keep)
    try:
        log.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
        log.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    finally:
        log.removeHandler(keep)
    assert seen == ["Token authentication is disabled for this Ray cluster. Anyone with network access ..."]
    assert len(log.filters) == 1
