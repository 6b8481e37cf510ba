"""User-facing errors: one clear message, exit code 2, no traceback (see `launcher.cli`)."""

from __future__ import annotations

EXIT_USAGE = 2
"""Exit code for bad input: a recipe, a path or an option the user can fix."""


class UserError(Exception):
    """Bad input the user can fix. The CLI prints the message alone and exits with code 2."""

    exit_code = EXIT_USAGE


class RecipeError(UserError):
    """A recipe key with a wrong value, type, or combination. `key` is the dotted path; `source`
    the recipe file; `origin` where the value came from when that is not `source` itself (a base
    recipe named in `defaults:`, or COMMAND_LINE for a `key=value` override)."""

    def __init__(
        self, key: str, message: str, *, source: str | None = None, origin: str | None = None
    ) -> None:
        self.key = key
        self.message = message
        self.source = source
        self.origin = origin
        where = f"{source}: " if source else ""
        if origin and origin != source:
            key = f"{key} ({'set on the command line' if origin == COMMAND_LINE else f'set in {origin}'})"
        super().__init__(f"{where}{key}: {message}")

    def with_source(self, source: str, origin: str | None = None) -> "RecipeError":
        return RecipeError(self.key, self.message, source=source, origin=origin or self.origin)


COMMAND_LINE = "command line"
"""The `origin` of a value set by a `key=value` override."""


class DataError(UserError):
    """A data file or row that does not fit the recipe's data format."""

EXIT_PREEMPTED = 75
"""Exit code of `launcher run` when a signal (SIGTERM, SIGINT, SIGUSR1) stopped training after
a checkpoint was committed (or there was no time to save one). Backends requeue on this code;
it is sysexits' EX_TEMPFAIL: "temporary failure, try again"."""
