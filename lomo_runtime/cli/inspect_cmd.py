"""`lomo-run inspect DIR [--json]`: validate a checkpoint and show its units.

Prints one row per unit (name, tensor count, bytes, dtypes) and the verdict.
With `--json`, prints one JSON object instead; for a bad checkpoint that
object is `{"valid": false, "error": ...}`. Either way a bad checkpoint exits
2 with a one-line message on stderr (the `UserError` path in `main`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..checkpoint import Checkpoint
from ..errors import UserError
from ..sizes import format_size
from . import cli


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """A JSON-ready summary of an opened checkpoint: architecture, files, units with bytes and dtypes."""
    units = []
    for unit in ckpt.units:
        entries = [ckpt.tensors[n].entry for n in unit.tensor_names]
        units.append({
            "name": unit.name,
            "tensors": len(entries),
            "bytes": sum(e.nbytes for e in entries),
            "dtypes": sorted({e.dtype for e in entries}),
        })
    return {
        "valid": True,
        "dir": str(ckpt.dir),
        "model_type": ckpt.config.get("model_type"),
        "architecture": ckpt.arch.name,
        "tied": ckpt.arch.tied(ckpt.config),
        "files": [p.name for p in ckpt.files],
        "num_tensors": len(ckpt.tensors),
        "total_bytes": ckpt.nbytes,
        "units": units,
    }


@cli.command("inspect")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def inspect(model_dir: Path, as_json: bool) -> None:
    """Validate the checkpoint in MODEL_DIR and list its units."""
    try:
        summary = describe(Checkpoint.open(model_dir))
    except UserError as err:
        if as_json:
            click.echo(json.dumps({"valid": False, "dir": str(model_dir), "error": str(err)}))
        raise
    if as_json:
        click.echo(json.dumps(summary))
        return
    width = max(len(u["name"]) for u in summary["units"])
    click.echo(f"{'unit':<{width}}  {'tensors':>7}  {'bytes':>10}  dtypes")
    for u in summary["units"]:
        click.echo(f"{u['name']:<{width}}  {u['tensors']:>7}  {format_size(u['bytes']):>10}  {','.join(u['dtypes'])}")
    tied = ", tied embeddings" if summary["tied"] else ""
    click.echo(
        f"ok: {summary['architecture']} model{tied}, {summary['num_tensors']} tensors, "
        f"{format_size(summary['total_bytes'])} in {len(summary['files'])} file(s)"
    )
