"""The `lomo-run` command line: thin click wrappers over the library.

Each command lives in its own module and only parses flags, calls the library
and prints. `main` maps `LomoError` subclasses to their exit codes (2 bad input,
3 does not fit, 1 internal) with a one-line message and no traceback.
"""
from __future__ import annotations

import sys

import click

from ..errors import LomoError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lomo-run")
def cli() -> None:
    """lomo-run: full-parameter fine-tuning with fused LOMO updates and streamed weights."""


def _register() -> None:
    # Commands register themselves on `cli`; importing them here keeps one entry point.
    from . import inspect_cmd  # noqa: F401
    for optional in ("plan_cmd", "train_cmd", "export_cmd", "probe_cmd", "eval_cmd", "report_cmd"):
        try:
            __import__(f"{__name__}.{optional}")
        except ModuleNotFoundError as err:  # a command whose module has not landed yet
            if err.name != f"{__name__}.{optional}":
                raise


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning lomo-run errors into messages and exit codes."""
    _register()
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as err:  # usage errors: exit 2, as click does
        err.show()
        sys.exit(2)
    except LomoError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(0)
