"""The `launcher` command line (typer + rich). User errors print one line and exit 2."""

from __future__ import annotations

import sys

from launcher.cli.app import app
from launcher.errors import UserError


def main() -> None:
    # typer's standalone mode handles usage errors itself (exit 2); our own UserError passes through.
    try:
        app()
    except UserError as e:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
