"""`lomo-run export`: a working store's last committed step to Hugging Face layout."""
from __future__ import annotations

import contextlib
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
    from ..dist import rank_dir, read_commit_record
    from ..dist.shard import iter_whole_tensors
    from ..store import TensorSlot, WorkingStore

    with contextlib.ExitStack() as opened:
        record = read_commit_record(Path(store_dir))
        if record is None:  # one process's store
            stores = [opened.enter_context(WorkingStore.open(store_dir))]
        else:  # a run of several ranks: every rank's store must be reachable from here
            dirs = [rank_dir(store_dir, r) for r in range(int(record["world_size"]))]
            missing = [str(d) for d in dirs if not (d / "manifest.json").exists()]
            if missing:
                raise UserError(f"{store_dir} is a {record['world_size']}-rank run's store; {', '.join(missing)} "
                                "not found here (copy every rank's store directory onto one machine)")
            count = 1 if record.get("parallel") == "replicate" else len(dirs)  # replicas are identical
            stores = [opened.enter_context(WorkingStore.open(d, committed_step=int(record["step"])))
                      for d in dirs[:count]]
        store = stores[0]
        meta = store.meta
        if "config" not in meta:
            raise UserError(f"{store_dir}: the store's manifest has no model config; it was not made by lomo-run train")
        tensors = iter_whole_tensors(stores) if "shard" in meta else store.iter_tensors()
        weights = ((name, t) for name, t in tensors if STATE_SEP not in name)
        source = meta.get("source_dir")
        # One shard is held in memory while it is written: keep shards at 512 MiB (or the largest tensor).
        layouts = ([TensorSlot.from_json(t) for t in u["tensors"]] for u in meta["shard"]["units"].values()) \
            if "shard" in meta else (rec.tensors for rec in store.units.values())
        largest = max(slot.nbytes for slots in layouts for slot in slots)
        with WorkProgress(f"exporting to {out_dir}") as shown:  # on stderr, for models that take a while
            export_hf(Path(out_dir), meta["config"], weights, source if source and Path(source).is_dir() else None,
                      max_shard_bytes=max(largest, 512 * 2**20),
                      on_tensor=lambda name, n, done, total: shown.update(done, name, total_bytes=total))
        click.echo(f"exported step {store.step} of {store_dir} to {out_dir}")
