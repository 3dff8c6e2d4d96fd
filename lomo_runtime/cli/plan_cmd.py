"""`lomo-run plan`: will a job fit, where do units live, how fast is a step, before launch."""
from __future__ import annotations

import json

import click

from ..checkpoint.checkpoint import load_config
from ..errors import DoesNotFit
from ..planner import RunConfig, format_plan, largest_fitting, plan
from ..planner.gpus import GPUS
from ..probe import load_machine, with_flags
from ..sizes import parse_size
from . import cli


def _size(value: str | None, what: str) -> int | None:
    return None if value is None else parse_size(value, what)


@cli.command("plan")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Model directory; config.json alone is enough.")
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--rule", type=click.Choice(["sgd", "adamw", "adalomo"]), default="sgd", show_default=True)
@click.option("--memory-budget", help="Device memory (on CPU: process RSS) to fit, e.g. 24GiB.")
@click.option("--weights-budget", help="Cap on resident weight bytes (experts, tests).")
@click.option("--heap-keep", help="Freed heap the runtime keeps mapped (train --heap-keep), e.g. 256MiB.")
@click.option("--host-memory", help="Host RAM (default: this machine's).")
@click.option("--host-memory-budget", help="cuda: host memory for units between device uses (train's flag); "
                                           "default: every unit if they fit in RAM.")
@click.option("--offload-dir", default=None, type=click.Path(), help="Where the working store goes (free space is checked).")
@click.option("--prefetch-depth", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--gpu", type=click.Choice(sorted(GPUS)), default=None,
              help="With --device cuda: plan with this GPU's published figures (FLOP/s, PCIe, memory) "
                   "instead of a CUDA probe's.")
@click.option("--flops", type=float, default=None, help="Override sustained FLOP/s of the device.")
@click.option("--disk-read-bw", type=float, default=None, help="Override disk read bytes/s.")
@click.option("--disk-write-bw", type=float, default=None, help="Override disk write bytes/s.")
@click.option("--pcie-bandwidth", "--h2d-bw", "pcie_bandwidth", type=float, default=None,
              help="Override host-device copy bytes/s, each direction (CUDA).")
@click.option("--commit-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Steps between commits: resident units are written only then.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ranks (torchrun --nproc-per-node x nodes); --batch-size is per rank.")
@click.option("--parallel", type=click.Choice(["replicate", "shard"]), default=None,
              help="How the ranks split the work (with --nproc above 1).")
@click.option("--allreduce-bw", type=float, default=None, help="Override all-reduce bytes/s between ranks.")
@click.option("--max-batch-size", is_flag=True, help="Search the largest batch size that fits.")
@click.option("--max-seq-len", is_flag=True, help="Search the longest sequence that fits.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan_command(model_dir, seq_len, batch_size, device, dtype, rule, memory_budget, weights_budget, heap_keep, host_memory,
                 host_memory_budget, offload_dir, prefetch_depth, gpu, flops, disk_read_bw, disk_write_bw, pcie_bandwidth, commit_every, nproc,
                 parallel, allreduce_bw, max_batch_size, max_seq_len, as_json) -> None:
    """Predict peak memory, I/O and step time of a training job, and whether it fits.

    On --device cuda the GPU's figures come from --gpu NAME, else from `lomo-run probe --device cuda`'s
    cache, else from --flops and --pcie-bandwidth (needed then); flags override either.
    """
    if max_batch_size and max_seq_len:
        raise click.UsageError("--max-batch-size and --max-seq-len: choose one")
    if gpu is not None and device != "cuda":
        raise click.UsageError("--gpu needs --device cuda")
    if host_memory_budget is not None and device != "cuda":
        raise click.UsageError("--host-memory-budget needs --device cuda")
    config = load_config(model_dir)
    budget = _size(memory_budget, "--memory-budget")
    machine = load_machine(device, dtype, nvme_dir=offload_dir, host_memory=_size(host_memory, "--host-memory"),
                           device_memory=budget if device == "cuda" else None, gpu=gpu)
    with_flags(machine, device, {"flops_per_s": flops, "disk_read_bps": disk_read_bw, "disk_write_bps": disk_write_bw,
                                 "h2d_bps": pcie_bandwidth, "d2h_bps": pcie_bandwidth, "allreduce_bps": allreduce_bw})
    run = RunConfig(seq_len=seq_len, batch_size=batch_size, dtype=dtype, rule=rule, device=device,
                    memory_budget=budget, weights_budget=_size(weights_budget, "--weights-budget"),
                    prefetch_depth=prefetch_depth, heap_keep=_size(heap_keep, "--heap-keep") or 0,
                    nproc=nproc, parallel=parallel, commit_every=commit_every,
                    host_budget=_size(host_memory_budget, "--host-memory-budget"))
    if max_batch_size or max_seq_len:
        result = largest_fitting(config, run, machine, "batch_size" if max_batch_size else "seq_len")
    else:
        result = plan(config, run, machine)
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        click.echo(format_plan(result))
    if not result.fits:
        raise DoesNotFit(f"the job does not fit: {result.reason}; {result.suggestion}")
