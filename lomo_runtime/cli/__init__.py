"""The `lomo-run` command line: thin click wrappers over the library.

Each command lives in its own module and only parses flags, calls the library
and prints. `main` maps `LomoError` subclasses to their exit codes (2 bad input,
3 does not fit, 1 internal) with a one-line message and no traceback.
"""
from __future__ import annotations

import os
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


def _budget_governed(args: list[str]) -> bool:
    """Does this command line train under a memory budget (a flag, or `memory_budget` in its YAML)?"""
    if "train" not in args:
        return False
    if any(a == "--memory-budget" or a.startswith("--memory-budget=") for a in args):
        return True
    for i, a in enumerate(args):
        path = args[i + 1] if a == "--config" and i + 1 < len(args) else a[len("--config="):] if a.startswith("--config=") else None
        if path:
            try:
                return "memory_budget" in open(path, encoding="utf-8").read()
            except OSError:
                return False
    return False


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning lomo-run errors into messages and exit codes."""
    if "torch" not in sys.modules and _budget_governed(sys.argv[1:] if argv is None else argv):
        # Before torch loads MKL: its buffer cache (the "fast memory manager") keeps GEMM buffers
        # sized by the largest matmuls, which neither the trim nor the plan accounts for (README: Accuracy on CPU).
        os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
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
