"""The ``streamrec`` command line.

Sub-commands live in one module each (``data``, ``features``, ``train``, ``serve``...) and are
registered here. User errors (:class:`~streamrec.errors.StreamRecError`) are printed as one line
on stderr with a non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from streamrec.errors import StreamRecError

app = typer.Typer(
    name="streamrec",
    help="StreamRec: multi-stage recommender (retrieval -> DCN-V2 ranking -> re-ranking) on Ray + Feast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: (module under streamrec.cli, command group name or None for top-level commands)
_SUBCOMMANDS: list[tuple[str, str | None]] = [
    ("data", "data"),
    ("features", "features"),
    ("train", None),
    ("serve", None),
    ("monitor", "monitor"),
    ("registry", "registry"),
    ("experiments", "experiments"),
    ("catalogue", "catalogue"),
]


def _register() -> None:
    for module, name in _SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"streamrec.cli.{module}")
        except ModuleNotFoundError as err:
            if err.name == f"streamrec.cli.{module}":
                continue  # that part of the CLI is not built yet
            raise
        sub = mod.app
        if name:
            app.add_typer(sub, name=name)
        else:
            for cmd in sub.registered_commands:
                app.registered_commands.append(cmd)


_register()


def main() -> None:
    """Console-script entry point."""
    try:
        rc = app(standalone_mode=False)
    except StreamRecError as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(err.exit_code)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as err:  # click's usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
    # Outside standalone mode click returns a command's `raise typer.Exit(code)` instead of raising it.
    if isinstance(rc, int) and rc:
        sys.exit(rc)
