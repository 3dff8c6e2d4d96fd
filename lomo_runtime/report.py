"""`write_report(out_dir)`: one PNG and a JSON summary of a training run's `metrics.jsonl` and `plan.json`.

The PNG has four panels over steps, sharing the step axis:

1. loss: the training loss of each kept step, `eval_loss` points (from any line
   that has one, with or without a "loss"), `final_eval_loss` as a star;
   dropped steps as red crosses and dotted vertical lines (in every panel);
   lines written back after a crash (`"recovered": true`) as hollow circles.
2. tokens/s: `tokens_per_s`, or `tokens / step_time_s` where a line lacks it.
3. memory: measured `peak_host_bytes` (and `weights_resident_peak_bytes`) per
   step, against the plan's `peak_host_bytes` (and `memory.weights_resident_bytes`)
   as dashed horizontal lines; dropped attempts' peaks as crosses.
4. phases: `forward_s`, `backward_s`, `read_wait_s`, `write_wait_s`, `commit_s`
   stacked per step, plus "other" (what `step_time_s` holds beyond them; a
   step without any phase field is all "other"). Without any phase field in
   the file, `step_time_s` alone, and the title says so. Steps whose line has
   `"committed": true` get a tick at the top of the panel.

Which lines count: a line with a numeric "step" and a "loss" key is a training
step; `"dropped": true` makes it a dropped attempt (the trainer logs it under
the last committed step, so it is drawn at step + 1, the step it tried to
reach). Timing figures (median step time, tokens/s, phase shares) are over
kept steps only; the measured peak is over every training line, dropped
attempts included (their memory was really used). A step logged twice keeps
its last line. Lines without a "loss" only feed the eval series.

Bad input (no directory, no or empty metrics file, a damaged metrics line, no
training step) raises `UserError` naming the file; a missing or damaged
`plan.json` is a warning (the report is drawn without the plan). matplotlib is
imported only when a report is drawn, and only its Agg canvas is used, so the
caller's pyplot backend is left alone.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from .errors import UserError
from .progress import read_metrics
from .sizes import format_size

PHASES = ("forward_s", "backward_s", "read_wait_s", "write_wait_s", "commit_s")
_PHASE_COLORS = {"forward_s": "#4c72b0", "backward_s": "#dd8452", "read_wait_s": "#55a868",
                 "write_wait_s": "#c44e52", "commit_s": "#8172b3", "other": "#b0b0b0"}
_BARS_UP_TO = 300  # steps; more are drawn as a stacked area


def write_report(out_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Draw OUT_DIR's report to `output` (default OUT_DIR/report.png) and its summary beside it.

    The summary (returned, and written as JSON to the PNG's path with `.json`)
    holds the figures `format_summary` prints; `warnings` lists what was left
    out (a missing or damaged plan.json, lines without a step).
    """
    out = Path(out_dir)
    if not out.exists():
        raise UserError(f"{out}: no such directory (give the --out directory of a train run)")
    if not out.is_dir():
        raise UserError(f"{out}: not a directory (give the --out directory of a train run)")
    png = Path(output) if output is not None else out / "report.png"
    if png.suffix.lower() != ".png":
        raise UserError(f"--output {png}: the report is a PNG; give a path ending in .png")
    metrics_path = out / "metrics.jsonl"
    warnings: list[str] = []
    run = _load_run(metrics_path, warnings)
    plan = _load_plan(out / "plan.json", warnings)
    summary = _summarise(run, plan, out, png, warnings)
    _draw(run, plan, summary, png)
    _write_json(png.with_suffix(".json"), summary)
    return summary


# ---- reading --------------------------------------------------------------------------------------


def _num(record: dict[str, Any], key: str) -> float | None:
    """record[key] as a finite float, or None (missing, null for NaN, a string, a bool)."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _load_run(path: Path, warnings: list[str]) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path}: no metrics file (is this the --out directory of a train run?)")
    try:
        records = read_metrics(path)
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a metrics file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror or err}") from None
    if not records:
        raise UserError(f"{path}: no metrics (the file is empty)")
    kept: dict[int, dict[str, Any]] = {}
    dropped: list[dict[str, Any]] = []
    evals: list[tuple[int, float]] = []
    final_evals: list[tuple[int, float]] = []
    final_accuracy: float | None = None
    skipped = 0
    for record in records:
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            skipped += 1
            continue
        if "loss" in record:
            if record.get("dropped") is True:
                dropped.append(record)
            else:
                kept[step] = record  # a step logged twice keeps its last line
        if (value := _num(record, "eval_loss")) is not None and record.get("dropped") is not True:
            evals.append((step, value))
        if (value := _num(record, "final_eval_loss")) is not None:
            final_evals.append((step, value))
        if (value := _num(record, "final_eval_accuracy")) is not None:
            final_accuracy = value
    if skipped:
        warnings.append(f"{path}: skipped {skipped} line(s) without an integer \"step\"")
    if not kept and not dropped:
        raise UserError(f"{path}: no training steps (no line with a \"loss\")")
    steps = [kept[s] for s in sorted(kept)]
    return {"path": path, "steps": steps, "dropped": dropped, "evals": sorted(evals, key=lambda e: e[0]),
            "final_evals": final_evals, "final_eval_accuracy": final_accuracy}


def _load_plan(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    if not path.exists():
        warnings.append(f"{path}: no plan; the report is drawn without it")
        return None
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        warnings.append(f"{path}: damaged (not readable JSON); the report is drawn without the plan")
        return None
    if not isinstance(plan, dict) or _num(plan, "peak_host_bytes") is None:
        warnings.append(f"{path}: damaged (no numeric \"peak_host_bytes\"); the report is drawn without the plan")
        return None
    return plan


def _planned_weights(plan: dict[str, Any] | None) -> float | None:
    memory = plan.get("memory") if plan else None
    return _num(memory, "weights_resident_bytes") if isinstance(memory, dict) else None


def _tokens_per_s(record: dict[str, Any]) -> float | None:
    rate = _num(record, "tokens_per_s")
    if rate is not None:
        return rate
    tokens, elapsed = _num(record, "tokens"), _num(record, "step_time_s")
    return tokens / elapsed if tokens is not None and elapsed else None


# ---- the summary ----------------------------------------------------------------------------------


def _summarise(run: dict[str, Any], plan: dict[str, Any] | None, out: Path, png: Path,
               warnings: list[str]) -> dict[str, Any]:
    steps, dropped = run["steps"], run["dropped"]
    timed = [r for r in steps if _num(r, "step_time_s") is not None]
    rates = [v for r in steps if (v := _tokens_per_s(r)) is not None]
    peaks = [v for r in steps + dropped if (v := _num(r, "peak_host_bytes")) is not None]
    weights = [v for r in steps + dropped if (v := _num(r, "weights_resident_peak_bytes")) is not None]
    planned = _num(plan, "peak_host_bytes") if plan else None
    planned_weights = _planned_weights(plan)
    planned = int(planned) if planned is not None else None
    planned_weights = int(planned_weights) if planned_weights is not None else None
    measured = int(max(peaks)) if peaks else None
    measured_weights = int(max(weights)) if weights else None

    has_phases = any(_num(r, p) is not None for r in timed for p in PHASES)
    total = sum(_num(r, "step_time_s") for r in timed)
    shares: dict[str, float] | None = None
    if has_phases and total > 0:
        shares = {p: sum(_num(r, p) or 0.0 for r in timed) / total for p in PHASES}
        shares["other"] = sum(_other(r) for r in timed) / total
    losses = [v for r in steps if (v := _num(r, "loss")) is not None]
    committed = [r["step"] for r in steps if r.get("committed") is True]
    any_committed_key = any("committed" in r for r in steps)
    return {
        "out_dir": str(out),
        "png": str(png),
        "json": str(png.with_suffix(".json")),
        "metrics": str(run["path"]),
        "steps": len(steps),
        "first_step": steps[0]["step"] if steps else None,
        "last_step": steps[-1]["step"] if steps else None,
        "dropped": len(dropped),
        "dropped_steps": [r["step"] + 1 for r in dropped],
        "recovered": sum(1 for r in steps if r.get("recovered") is True),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "eval_loss": run["evals"][-1][1] if run["evals"] else None,
        "final_eval_loss": run["final_evals"][-1][1] if run["final_evals"] else None,
        "final_eval_accuracy": run["final_eval_accuracy"],
        "median_step_time_s": statistics.median(_num(r, "step_time_s") for r in timed) if timed else None,
        "median_tokens_per_s": statistics.median(rates) if rates else None,
        "total_step_time_s": total,
        "peak_host_bytes_measured": measured,
        "peak_host_bytes_planned": planned,
        "peak_host_ratio": measured / planned if measured is not None and planned else None,
        "weights_resident_peak_bytes_measured": measured_weights,
        "weights_resident_bytes_planned": planned_weights,
        "weights_resident_ratio": (measured_weights / planned_weights
                                   if measured_weights is not None and planned_weights else None),
        "phase_breakdown": has_phases,
        "phase_share": shares,
        "committed_steps": len(committed) if any_committed_key else None,
        "plan": plan is not None,
        "warnings": list(warnings),
    }


def _other(record: dict[str, Any]) -> float:
    """What step_time_s holds beyond the phase fields (0 if they overlap to more than it)."""
    elapsed = _num(record, "step_time_s") or 0.0
    return max(0.0, elapsed - sum(_num(record, p) or 0.0 for p in PHASES))


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def format_summary(summary: dict[str, Any]) -> str:
    """The report's figures as a few lines of text."""
    s = summary
    lines = [
        f"steps      {s['steps']} kept"
        + (f" (steps {s['first_step']}..{s['last_step']})" if s["steps"] else "") + f", {s['dropped']} dropped"
        + (f" (at {', '.join(map(str, s['dropped_steps'][:8]))}{' ...' if len(s['dropped_steps']) > 8 else ''})"
           if s["dropped"] else "")
        + (f", {s['recovered']} recovered after a crash" if s["recovered"] else ""),
        f"loss       {_fmt(s['first_loss'], '.4f')} -> {_fmt(s['final_loss'], '.4f')}"
        + (f"; eval {s['eval_loss']:.4f}" if s["eval_loss"] is not None else "")
        + (f"; final eval {s['final_eval_loss']:.4f}" if s["final_eval_loss"] is not None else "")
        + (f"; final eval accuracy {s['final_eval_accuracy']:.3f}" if s["final_eval_accuracy"] is not None else ""),
        f"step time  median {_fmt(s['median_step_time_s'], '.3g', ' s')}, "
        f"median {_fmt(s['median_tokens_per_s'], ',.1f', ' tokens/s')}",
    ]
    measured, planned = s["peak_host_bytes_measured"], s["peak_host_bytes_planned"]
    line = f"peak host  measured {format_size(measured) if measured is not None else 'n/a'}"
    if planned is not None:
        line += f", planned {format_size(planned)}"
        if s["peak_host_ratio"] is not None:
            line += f" (measured/planned {s['peak_host_ratio']:.3f})"
    else:
        line += ", no plan"
    lines.append(line)
    mw, pw = s["weights_resident_peak_bytes_measured"], s["weights_resident_bytes_planned"]
    if mw is not None or pw is not None:
        line = f"weights    resident peak {format_size(mw) if mw is not None else 'n/a'}"
        if pw is not None:
            line += f", planned {format_size(pw)}"
            if s["weights_resident_ratio"] is not None:
                line += f" (measured/planned {s['weights_resident_ratio']:.3f})"
        lines.append(line)
    if s["phase_share"]:
        lines.append("phases     " + ", ".join(f"{name.removesuffix('_s')} {share:.1%}"
                                               for name, share in s["phase_share"].items())
                     + f" of {s['total_step_time_s']:.3g} s")
    else:
        lines.append("phases     not recorded in metrics.jsonl (step_time_s only)")
    if s["committed_steps"] is not None:
        lines.append(f"commits    {s['committed_steps']} of {s['steps']} steps")
    lines.append(f"report     {s['png']} and {s['json']}")
    return "\n".join(lines)


def _write_json(path: Path, summary: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(_finite(summary), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"{path}: cannot write the summary: {err.strerror or err}") from None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


# ---- drawing --------------------------------------------------------------------------------------


def _draw(run: dict[str, Any], plan: dict[str, Any] | None, summary: dict[str, Any], png: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise UserError("report needs matplotlib: pip install 'matplotlib>=3.7'") from None

    steps, dropped = run["steps"], run["dropped"]
    fig = Figure(figsize=(10, 12), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_rate, ax_mem, ax_phase = fig.subplots(4, 1, sharex=True)
    fig.suptitle(_title(run, plan), fontsize=11)
    dropped_x = [r["step"] + 1 for r in dropped]

    # 1. loss
    kept = [(r["step"], v, r.get("recovered") is True) for r in steps if (v := _num(r, "loss")) is not None]
    if kept:
        ax_loss.plot([x for x, _, _ in kept], [v for _, v, _ in kept], "-", color="#4c72b0", lw=1.2,
                     marker="." if len(kept) <= 200 else None, label="loss")
    recovered = [(x, v) for x, v, rec in kept if rec]
    if recovered:
        ax_loss.plot(*zip(*recovered), "o", mfc="none", mec="#4c72b0", ms=8, label="recovered line")
    if run["evals"]:
        ax_loss.plot(*zip(*run["evals"]), "o", color="#dd8452", ms=5, label="eval loss")
    if run["final_evals"]:
        ax_loss.plot(*zip(*run["final_evals"]), "*", color="#c44e52", ms=12, label="final eval loss")
    if dropped:
        finite = [(r["step"] + 1, v) for r in dropped if (v := _num(r, "loss")) is not None]
        if finite:
            ax_loss.plot(*zip(*finite), "x", color="red", ms=8, mew=2)
        lossless = [r["step"] + 1 for r in dropped if _num(r, "loss") is None]  # a NaN loss is logged as null
        if lossless:
            ax_loss.plot(lossless, [0.95] * len(lossless), "x", color="red", ms=8, mew=2,
                         transform=ax_loss.get_xaxis_transform())
        ax_loss.plot([], [], "x", color="red", ms=8, mew=2, label=f"dropped ({len(dropped)})")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")

    # 2. tokens/s
    rates = [(r["step"], v) for r in steps if (v := _tokens_per_s(r)) is not None]
    if rates:
        ax_rate.plot(*zip(*rates), "-", color="#55a868", lw=1.2, marker="." if len(rates) <= 200 else None,
                     label="tokens/s")
        ax_rate.axhline(summary["median_tokens_per_s"], color="#55a868", ls=":", lw=1,
                        label=f"median {summary['median_tokens_per_s']:,.1f}")
        ax_rate.set_ylim(bottom=0)
    else:
        _empty(ax_rate, "no tokens_per_s, tokens or step_time_s in metrics.jsonl")
    ax_rate.set_ylabel("tokens/s")
    ax_rate.set_title("throughput")

    # 3. memory
    _draw_memory(ax_mem, steps, dropped, summary, plan)

    # 4. phases
    _draw_phases(ax_phase, steps, summary["phase_breakdown"])
    ax_phase.set_xlabel("step")

    for ax in (ax_loss, ax_rate, ax_mem, ax_phase):
        for x in dropped_x:
            ax.axvline(x, color="red", ls=":", lw=0.8, alpha=0.6)
        ax.grid(True, alpha=0.3)
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    xs = [r["step"] for r in steps] + dropped_x
    if xs and max(xs) - min(xs) < 20:
        ax_phase.xaxis.get_major_locator().set_params(integer=True)

    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        tmp = png.with_name(png.name + ".tmp")
        fig.savefig(tmp, format="png")
        os.replace(tmp, png)
    except OSError as err:
        raise UserError(f"{png}: cannot write the report: {err.strerror or err}") from None


def _draw_phases(ax: Any, steps: list[dict[str, Any]], has_phases: bool) -> None:
    timed = [r for r in steps if _num(r, "step_time_s") is not None]
    if not timed:
        _empty(ax, "no step_time_s in metrics.jsonl")
        ax.set_title("step time")
        return
    xs = [r["step"] for r in timed]
    if has_phases:
        layers = {p: [_num(r, p) or 0.0 for r in timed] for p in PHASES}
        layers = {p: v for p, v in layers.items() if any(v)}
        layers["other"] = [_other(r) for r in timed]
        ax.set_title("phases per step (other: step_time_s beyond the recorded phases)")
    else:
        layers = {"step_time_s": [_num(r, "step_time_s") for r in timed]}
        ax.set_title("step time (no phase breakdown in metrics.jsonl: step_time_s only)")
    if len(timed) <= _BARS_UP_TO:
        gaps = [b - a for a, b in zip(xs, xs[1:])]
        width = 0.8 * min(gaps) if gaps else 0.8
        bottom = [0.0] * len(xs)
        for name, values in layers.items():
            ax.bar(xs, values, width=width, bottom=bottom, color=_PHASE_COLORS.get(name, "#4c72b0"),
                   label=name.removesuffix("_s"))
            bottom = [b + v for b, v in zip(bottom, values)]
    else:
        ax.stackplot(xs, *layers.values(), labels=[n.removesuffix("_s") for n in layers],
                     colors=[_PHASE_COLORS.get(n, "#4c72b0") for n in layers])
    committed = [r["step"] for r in steps if r.get("committed") is True]
    if committed:
        ax.plot(committed, [0.98] * len(committed), "v", color="black", ms=4,
                transform=ax.get_xaxis_transform(), label=f"committed ({len(committed)})")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.08)  # room for the commit ticks
    ax.set_ylabel("seconds")


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")


def _size_unit(largest: float, smallest_unit: str = "KiB") -> tuple[float, str]:
    """The scale and name of the binary unit that shows `largest` bytes as a number below 2048."""
    units = [(2**10, "KiB"), (2**20, "MiB"), (2**30, "GiB"), (2**40, "TiB")]
    units = units[[name for _, name in units].index(smallest_unit):]
    for scale, name in units:
        if largest < 2048 * scale:
            return scale, name
    return units[-1]


def _draw_memory(ax: Any, steps: list[dict[str, Any]], dropped: list[dict[str, Any]], summary: dict[str, Any],
                 plan: dict[str, Any] | None) -> None:
    """Measured peaks per step as lines, the plan's as dashed horizontal lines.

    Weights resident go on a second axis (right) when they are under a tenth of the
    host peak, so a small model's weights do not vanish on the floor of the host axis.
    """
    host = [v for v in (summary["peak_host_bytes_measured"], summary["peak_host_bytes_planned"]) if v is not None]
    weights = [v for v in (summary["weights_resident_peak_bytes_measured"], summary["weights_resident_bytes_planned"])
               if v is not None]
    if not host and not weights:
        _empty(ax, "no memory figures in metrics.jsonl and no plan")
        ax.set_title("memory")
        return
    separate = bool(host and weights) and max(weights) < 0.1 * max(host)
    host_scale, host_unit = _size_unit(max(host + ([] if separate else weights)), "MiB")
    w_ax, (w_scale, w_unit) = (ax.twinx(), _size_unit(max(weights))) if separate else (ax, (host_scale, host_unit))
    for target, scale, key, planned, color, name in (
        (ax, host_scale, "peak_host_bytes", summary["peak_host_bytes_planned"], "#4c72b0", "peak host"),
        (w_ax, w_scale, "weights_resident_peak_bytes", summary["weights_resident_bytes_planned"], "#dd8452",
         "weights resident" + (f" ({w_unit}, right)" if separate else "")),
    ):
        series = [(r["step"], v / scale) for r in steps if (v := _num(r, key)) is not None]
        if series:
            target.plot(*zip(*series), "-", color=color, lw=1.4, marker="." if len(series) <= 200 else None,
                        label=f"{name}, measured")
        attempts = [(r["step"] + 1, v / scale) for r in dropped if (v := _num(r, key)) is not None]
        if attempts:
            target.plot(*zip(*attempts), "x", color=color, ms=7, mew=2)
        if planned is not None:
            target.axhline(planned / scale, color=color, ls="--", lw=1.2, label=f"{name}, planned")
        target.set_ylim(bottom=0, top=max(target.get_ylim()[1], 1e-9) * 1.05)
    ax.set_ylabel(host_unit)
    if separate:
        w_ax.set_ylabel(f"weights resident ({w_unit})", color="#dd8452")
        w_ax.tick_params(axis="y", colors="#dd8452")
    handles, labels = ax.get_legend_handles_labels()
    if separate:
        more = w_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="lower left" if separate else "best")
    ratio = summary["peak_host_ratio"]
    ax.set_title("memory: measured vs planned" + (f" (peak host measured/planned {ratio:.2f})" if ratio else "")
                 + ("" if plan is not None else " (no plan.json)"))


def _title(run: dict[str, Any], plan: dict[str, Any] | None) -> str:
    title = f"lomo-run report: {run['path'].parent}"
    if plan:
        parts = [str(plan[k]) for k in ("model_type", "device", "dtype", "rule") if plan.get(k)]
        if isinstance(plan.get("batch_size"), int) and isinstance(plan.get("seq_len"), int):
            parts.append(f"batch {plan['batch_size']} x seq {plan['seq_len']}")
        if parts:
            title += "\n" + ", ".join(parts)
    return title
