"""The root `launcher` command, built from the verb modules. Each verb has an example in its help.

The verb modules hold plain functions and import only launcher.cli.common, never this module:
the whole command tree is registered here, in the order `launcher --help` lists it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from launcher.cli import backend_cmds, ckpt_cmds, ckpt_export_cmd, data_cmds, estimate_cmd, recipes_cmds, run_cmds
from launcher.cli.common import console

app = typer.Typer(
    name="launcher",
    help="Distributed training for Hugging Face models: recipes in, checkpoints out.\n\n"
    "Example: launcher run recipes/examples/tiny-sft.yaml train.max_steps=50",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        from launcher import __version__

        console.print(f"launcher {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


app.command()(run_cmds.run)
app.command()(run_cmds.plot)
app.command()(ckpt_cmds.resume)
app.command()(estimate_cmd.estimate)
app.command()(backend_cmds.submit)
app.command()(backend_cmds.status)
app.command()(backend_cmds.logs)
app.command()(backend_cmds.cancel)

recipes_app = typer.Typer(help="Validate, show and document recipes.", no_args_is_help=True)
recipes_app.command("validate")(recipes_cmds.recipes_validate)
recipes_app.command("show")(recipes_cmds.recipes_show)
recipes_app.command("docs")(recipes_cmds.recipes_docs)
app.add_typer(recipes_app, name="recipes")

ckpt_app = typer.Typer(help="List, verify and export checkpoints of a run.", no_args_is_help=True)
ckpt_app.command("list")(ckpt_cmds.ckpt_list)
ckpt_app.command("verify")(ckpt_cmds.ckpt_verify)
ckpt_app.command("export")(ckpt_export_cmd.ckpt_export)
app.add_typer(ckpt_app, name="ckpt")

data_app = typer.Typer(help="Prepare training data once: tokenized, memory-mapped, cached.", no_args_is_help=True)
data_app.command("prepare")(data_cmds.data_prepare)
app.add_typer(data_app, name="data")
