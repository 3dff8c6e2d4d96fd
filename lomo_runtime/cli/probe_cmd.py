"""`lomo-run probe`: measure disk, compute (CPU or CUDA) and framework overhead once; the planner reads the cache."""
from __future__ import annotations

import json

import click

from ..probe import cache_path, run_probe
from ..sizes import format_size
from . import cli


@cli.command("probe")
@click.option("--offload-dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Directory on the disk the working store will use.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: also pinned H2D/D2H bandwidth, bf16/fp16/fp32 matmul FLOP/s and device memory.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def probe_command(offload_dir: str, device: str, as_json: bool) -> None:
    """Measure disk read/write bandwidth, FLOP/s, host-device copies and framework RSS; cache them."""
    results = run_probe(offload_dir, device)
    if as_json:
        click.echo(json.dumps(results))
        return
    for key, value in results.items():
        figure = key.split(".")[0]
        if value is None:  # e.g. disk_read_bps.aio where DeepSpeed aio is not built
            value = "not measured"
        elif figure.endswith("bps"):
            value = f"{value / 1e9:.2f} GB/s"
        elif figure == "flops_per_s":
            value = f"{value / 1e9:.1f} GFLOP/s"
        elif figure.endswith("bytes"):
            value = format_size(value)
        click.echo(f"{key:<28} {value}")
    click.echo(f"cached in {cache_path()}")
