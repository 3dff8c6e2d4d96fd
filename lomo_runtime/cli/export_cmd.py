"""`lomo-run export`: a working store's last committed step to Hugging Face layout."""
from __future__ import annotations

from pathlib import Path

import click

from . import cli


@cli.command("export")
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False),
              help="The working store (OUT/store of a train run, or its --offload-dir).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Where to write the model.")
def export_command(store_dir: str, out_dir: str) -> None:
    """Export the last committed weights of a working store (e.g. of an interrupted run) in HF layout."""
    from ..checkpoint.export import export_hf
    from ..errors import UserError
    from ..runtime import STATE_SEP
    from ..progress import WorkProgress
    from ..store import WorkingStore

    with WorkingStore.open(store_dir) as store:
        meta = store.meta
        if "config" not in meta:
            raise UserError(f"{store_dir}: the store's manifest has no model config; it was not made by lomo-run train")
        weights = ((name, t) for name, t in store.iter_tensors() if STATE_SEP not in name)
        source = meta.get("source_dir")
        # One shard is held in memory while it is written: keep shards at 512 MiB (or the largest tensor).
        largest = max(slot.nbytes for rec in store.units.values() for slot in rec.tensors)
        with WorkProgress(f"exporting to {out_dir}") as shown:  # on stderr, for models that take a while
            export_hf(Path(out_dir), meta["config"], weights, source if source and Path(source).is_dir() else None,
                      max_shard_bytes=max(largest, 512 * 2**20),
                      on_tensor=lambda name, n, done, total: shown.update(done, name, total_bytes=total))
        click.echo(f"exported step {store.step} of {store_dir} to {out_dir}")
