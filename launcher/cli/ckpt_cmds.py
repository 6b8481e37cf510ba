"""`launcher resume` and `launcher ckpt list|verify|export`."""

from __future__ import annotations

import typer

from launcher.cli.app import app

ckpt_app = typer.Typer(help="List, verify and export checkpoints of a run.", no_args_is_help=True)
app.add_typer(ckpt_app, name="ckpt")
