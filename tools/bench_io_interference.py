"""Does the store's I/O slow the compute beside it? All-resident training steps with a stand-in
for a streamed step's I/O running in a background thread, or not, alternating step by step.

    python tools/bench_io_interference.py [--steps 25] [--rate 190e6] [--threads 2]
                                          [--out .cache/bench-io-interference]

One process, one all-resident `Runtime` on the demo model (SmolLM2-135M, the side-by-side
benchmark's data and batches). Step k runs with background mode k mod 4, so every mode sees the
same minutes of this shared machine:

    none      nothing beside the step
    read      O_DIRECT reads of 7 MiB (a unit's size) into one aligned buffer, at --rate bytes/s
    crc       CRC-32C of one 7 MiB buffer, which stays in cache, at --rate bytes/s
    read+crc  both on the same bytes: what a streamed step's read threads do (read, then verify)

The background thread runs only while a step runs; no step commits (the store is written at the end). --rate defaults to what the streamed row of
tools/bench_side_by_side.py moves (0.81 GB read + 0.42 GB written per step of about 6.5 s).
Prints, and writes to OUT/io_interference.json, each mode's median step time and its speed
against `none` (median of the ratios of step pairs k, k - mode: adjacent steps).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_side_by_side as side  # noqa: E402

MODES = ("none", "read", "crc", "read+crc")
CHUNK = 7 << 20


class Background:
    """The stand-in I/O: a thread that, while `active`, reads and/or checksums CHUNK bytes at `rate`."""

    def __init__(self, path: Path, rate: float):
        from lomo_runtime.io import aligned_empty

        self.path, self.rate = path, rate
        self.size = path.stat().st_size // CHUNK * CHUNK
        self.buf = aligned_empty(CHUNK)
        self.mode = "none"
        self.active = threading.Event()
        self.bytes = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from lomo_runtime.io import read_into
        from lomo_runtime.store import checksum

        view = memoryview(self.buf.numpy())
        offset = 0
        while True:
            self.active.wait()
            started, done = time.perf_counter(), 0
            while self.active.is_set():
                if "read" in self.mode:
                    read_into(self.path, offset, self.buf, CHUNK)
                    offset = (offset + CHUNK) % self.size
                if "crc" in self.mode:
                    checksum(view)
                done += CHUNK
                self.bytes += CHUNK
                ahead = done / self.rate - (time.perf_counter() - started)
                if ahead > 0:
                    time.sleep(ahead)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=".cache/smollm2-135m")
    parser.add_argument("--data", default=".cache/demo")
    parser.add_argument("--out", default=".cache/bench-io-interference")
    parser.add_argument("--steps", type=int, default=25, help="training steps; step 1 warms up and is not counted")
    parser.add_argument("--rate", type=float, default=190e6, help="background bytes per second while a step runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    for needed in (Path(args.model) / "config.json", Path(args.data) / "sentiment-train.jsonl"):
        if not needed.exists():
            sys.exit(f"{needed} is missing: run tools/build_smollm2.py and tools/build_demo_data.py first")
    import torch

    from lomo_runtime import SGD, Runtime

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    blob = out / "background.bin"
    if not blob.exists() or blob.stat().st_size < 256 << 20:
        with blob.open("wb") as f:
            for _ in range(32):
                f.write(os.urandom(8 << 20))
    ns = argparse.Namespace(model=args.model, data=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                            eval=0, lr=0.01, warmup_steps=4, steps=args.steps)
    _, batches, _ = side._data(ns)
    work = out / "store"
    shutil.rmtree(work, ignore_errors=True)
    background = Background(blob, args.rate)
    steps = []
    # No commit inside the run: a commit step writes the whole model, whatever its mode.
    with Runtime(args.model, SGD(lr=ns.lr), work_dir=work, commit_every=args.steps + 1) as rt:
        for index in range(args.steps):
            ids, labels = next(batches)
            mode = MODES[index % len(MODES)]
            background.mode, moved = mode, background.bytes
            if mode != "none":
                background.active.set()
            t0 = time.perf_counter()
            loss = rt.model(input_ids=ids, labels=labels).loss
            rt.backward(loss, lr=side._lr_at(ns, ns.lr, index))
            elapsed = time.perf_counter() - t0
            background.active.clear()
            steps.append({"step": index + 1, "mode": mode, "step_s": elapsed, "loss": float(loss.detach()),
                          "background_bytes": background.bytes - moved})
            print(f"step {index + 1}/{args.steps} [{mode}] {elapsed:.2f} s, background "
                  f"{steps[-1]['background_bytes'] / 1e6:.0f} MB", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    timed = steps[1:]
    summary = {"command": "python tools/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d"), "args": vars(args), "steps": steps, "modes": {}}
    for offset, mode in enumerate(MODES):
        mine = [s for s in timed if s["mode"] == mode]
        if not mine:
            continue
        # speed against `none`: each step of this mode against the nearest earlier `none` step
        pairs = [(steps[s["step"] - 1 - offset]["step_s"], s["step_s"]) for s in mine if offset and s["step"] - 1 - offset >= 1]
        summary["modes"][mode] = {
            "median_step_s": statistics.median(s["step_s"] for s in mine), "steps": len(mine),
            "speed_vs_none": statistics.median(a / b for a, b in pairs) if pairs else 1.0,
            "background_mb_per_s": statistics.median(s["background_bytes"] / s["step_s"] / 1e6 for s in mine),
        }
    print(f"\n{'mode':10s} {'steps':>5s} {'median step':>12s} {'speed vs none':>14s} {'background':>12s}")
    for mode, m in summary["modes"].items():
        print(f"{mode:10s} {m['steps']:5d} {m['median_step_s']:11.2f}s {m['speed_vs_none']:14.3f} "
              f"{m['background_mb_per_s']:9.0f} MB/s")
    (out / "io_interference.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out / 'io_interference.json'}")


if __name__ == "__main__":
    main()
