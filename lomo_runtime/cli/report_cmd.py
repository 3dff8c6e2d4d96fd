"""`lomo-run report OUT_DIR [--output PNG] [--json]`: plot a run's metrics.jsonl against its plan.json."""
from __future__ import annotations

import json

import click

from . import cli


@cli.command("report")
@click.argument("out_dir")
@click.option("--output", default=None, help="Where the PNG goes (default OUT_DIR/report.png); the JSON summary goes beside it.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def report_command(out_dir: str, output: str | None, as_json: bool) -> None:
    """Loss, tokens/s, memory measured vs planned, and time per phase over the steps of the run in OUT_DIR."""
    from ..report import format_summary, write_report  # matplotlib loads only here, so --help stays fast

    summary = write_report(out_dir, output)
    for warning in summary["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(format_summary(summary))
