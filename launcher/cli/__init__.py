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
        from rich.text import Text

        # The message quotes user input (keys, paths, pip extras like 'skypilot[aws]'): never markup.
        Console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", str(e)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
