"""Training progress on stderr, progress of long byte-counted work (copying a model into the
working store, an export), and the per-step metrics file `metrics.jsonl`.

Invariants of `metrics.jsonl`:
- One JSON object per line, each with an integer "step"; each line is written
  with a single `write(2)` on an O_APPEND descriptor and fsynced before
  `write` returns, so a line that was reported written survives a crash.
- A crash can leave at most one damaged line: the last, missing its "\\n".
  `read_metrics` skips such a tail; `MetricsWriter` cuts it off when it opens
  the file, so a new line is never glued onto a fragment.
- Only committed steps stay: resuming from the commit at step N opens the
  writer with `truncate_after_step=N`, which drops every line with step > N
  (those steps are replayed and written again). The rewrite is atomic
  (temporary file, fsync, rename), so a crash during it loses nothing.
- Lines are strict JSON: non-finite floats (a NaN loss) are written as null.

The progress display never affects training: it only reads what it is given,
plus this process's resident memory (psutil).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import psutil

from .errors import UserError
from .sizes import format_size


class SilentStream:
    """A text stream that drops everything (progress without a `progress_stream`)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class Progress:
    """A one-line training progress display: step/total, loss, tokens/s, peak memory, ETA.

    On a terminal the line is redrawn in place every update; otherwise (a log
    file, CI) a full line is printed every `every` steps and at the last step,
    so logs stay readable. Rates are averaged over the steps of this process
    (a resumed run starts counting at `start_step`).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        stream: TextIO | None = None,
        every: int | None = None,
        is_tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_steps = total_steps
        self.start_step = start_step
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = is_tty if is_tty is not None else _isatty(self.stream)
        # Without a terminal, about 20 lines per run, but at least one line per step for short runs.
        self.every = every if every is not None else max(1, total_steps // 20)
        self.clock = clock
        self._started = clock()
        self._tokens = 0
        self._peak_rss = 0
        self._process = psutil.Process()
        self._drawn = False

    def update(self, step: int, loss: float, tokens: int, peak_bytes: int | None = None) -> None:
        """Record finished step `step` (1-based count of steps done) and redraw if due.

        `tokens` are the tokens of this step; `peak_bytes` the runtime's
        measured peak, if it has one (otherwise the sampled process RSS peak).
        """
        self._tokens += tokens
        self._peak_rss = max(self._peak_rss, self._process.memory_info().rss)
        peak = peak_bytes if peak_bytes is not None else self._peak_rss
        due = self.is_tty or step % self.every == 0 or step >= self.total_steps
        if not due:
            return
        line = self.format_line(step, loss, peak)
        if self.is_tty:
            # \r returns to column 0; ESC[K clears what a longer previous line left behind.
            self.stream.write("\r" + line + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def format_line(self, step: int, loss: float, peak_bytes: int) -> str:
        """The progress line for `step` (no newline)."""
        elapsed = max(self.clock() - self._started, 1e-9)
        done = max(step - self.start_step, 0)
        rate = self._tokens / elapsed
        if done > 0 and step < self.total_steps:
            eta = _format_duration(elapsed / done * (self.total_steps - step))
        else:
            eta = "--" if done == 0 else "0s"
        parts = [
            f"step {step}/{self.total_steps}",
            f"loss {loss:.4f}",
            f"{_format_count(rate)} tok/s",
            f"peak {format_size(peak_bytes)}",
            f"eta {eta}",
        ]
        head = parts[0] + (" " + _bar(step, self.total_steps) if self.is_tty else "")
        return " | ".join([head, *parts[1:]])

    def write(self, message: str) -> None:
        """Print a message (eval result, checkpoint note) without garbling the live line."""
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the live line so the next output starts on a fresh line."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class WorkProgress:
    """Progress of one long piece of work measured in bytes, e.g.
    ``creating working store: 412 MiB / 3.25 GiB (12%), 310 MiB/s, ETA 9s (block.3)``.

    Why: copying a 3.25 GiB model into the working store (or exporting it) takes
    tens of seconds before the first step line, and silence reads as a hang.
    A line is printed at most every `min_interval_s` seconds, and `close` prints
    one summary line, ``creating working store: 3.25 GiB in 11s (302 MiB/s)``,
    unless the work was over in under `min_interval_s` (a tiny model: silence). On a terminal the
    line is redrawn in place, as `Progress` does. The rate is the average since
    the display was made. `total_bytes` may be unknown (``None`` or 0: the line
    shows bytes and rate only) or refined by `update` (an export learns the
    dtypes as tensors arrive); percent and ETA are clamped, since a caller's
    total may be a few KiB off (a unit file's alignment padding).
    """

    def __init__(
        self,
        label: str,
        total_bytes: int | None = None,
        *,
        stream: TextIO | None = None,
        min_interval_s: float = 2.0,
        is_tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total_bytes = int(total_bytes) if total_bytes else None
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = is_tty if is_tty is not None else _isatty(self.stream)
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._started = clock()
        self._last_print = self._started
        self.done_bytes = 0
        self._drawn = False
        self._closed = False

    def update(self, done_bytes: int, detail: str = "", *, total_bytes: int | None = None) -> None:
        """Record `done_bytes` done so far (cumulative) and print a line if `min_interval_s` has passed.

        `detail` (the unit or tensor just finished) ends the line in parentheses;
        a `total_bytes` given here replaces the one given at construction.
        """
        self.done_bytes = done_bytes
        if total_bytes:
            self.total_bytes = int(total_bytes)
        now = self.clock()
        if self._closed or now - self._last_print < self.min_interval_s:
            return
        self._last_print = now
        self._emit(self.format_line(detail))

    def format_line(self, detail: str = "") -> str:
        """The progress line for the bytes done so far (no newline)."""
        elapsed = max(self.clock() - self._started, 1e-9)
        rate = self.done_bytes / elapsed
        line = f"{self.label}: {format_size(self.done_bytes)}"
        if self.total_bytes:
            percent = min(100, int(100 * self.done_bytes / self.total_bytes))
            line += f" / {format_size(self.total_bytes)} ({percent}%)"
        line += f", {format_size(rate)}/s"
        if self.total_bytes and rate > 0:
            line += f", ETA {_format_duration(max(self.total_bytes - self.done_bytes, 0) / rate)}"
        return line + (f" ({detail})" if detail else "")

    def close(self) -> None:
        """Print the summary line (bytes done, time taken, average rate); idempotent."""
        if self._closed:
            return
        self._closed = True
        elapsed = max(self.clock() - self._started, 1e-9)
        if elapsed < self.min_interval_s and self._last_print == self._started:
            return  # quick work: nothing was shown, and nothing needs saying
        line = (f"{self.label}: {format_size(self.done_bytes)} in {_format_duration(elapsed)}"
                f" ({format_size(self.done_bytes / elapsed)}/s)")
        self._emit(line)
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def _emit(self, line: str) -> None:
        if self.is_tty:
            self.stream.write("\r" + line + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def __enter__(self) -> WorkProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False


def _bar(step: int, total: int, width: int = 20) -> str:
    filled = width if total <= 0 else min(width, width * step // total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _format_count(value: float) -> str:
    for suffix, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# --------------------------------------------------------------------------- metrics.jsonl


class MetricsWriter:
    """Appends one JSON object per line to a metrics file, durably (see the module invariants)."""

    def __init__(self, path: str | os.PathLike[str], truncate_after_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        if not created:
            self._repair(truncate_after_step)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:
            _fsync_dir(self.path.parent)  # the new file's directory entry must survive a crash too

    def _repair(self, truncate_after_step: int | None) -> None:
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]  # drop a crash's unterminated last line
        if truncate_after_step is None:
            if len(complete) != len(raw):
                os.truncate(self.path, len(complete))
            return
        kept = [
            line for number, line in enumerate(complete.splitlines(keepends=True), start=1)
            if line.strip() and _step_of(line, self.path, number) <= truncate_after_step
        ]
        if sum(map(len, kept)) == len(raw):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            out.writelines(kept)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append `record` (must hold an integer "step") as one line, then fsync."""
        if self._fd is None:
            raise ValueError("MetricsWriter is closed")
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"a metrics record needs an integer 'step', got {step!r}")
        data = (json.dumps(_finite(dict(record)), allow_nan=False, default=_json_default) + "\n").encode()
        written = os.write(self._fd, data)
        if written != len(data):  # a short write on a regular file means the disk is full
            raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes)")
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a metrics file, skipping a truncated last line (a crash mid-write).

    A damaged line anywhere else is not a crash artifact and raises `UserError`
    naming the file and line.
    """
    path = Path(path)
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    records = []
    for number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}:{number}: damaged metrics line (not JSON)") from None
    return records


def _step_of(line: bytes, path: Path, number: int) -> int:
    try:
        step = json.loads(line)["step"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{path}:{number}: damaged metrics line (no JSON object with a step)") from None
    if not isinstance(step, int):
        raise UserError(f"{path}:{number}: metrics line has a non-integer step {step!r}")
    return step


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _json_default(value: Any) -> Any:
    # Tensors and numpy scalars (a loss, a byte count) are recorded as their Python value.
    if hasattr(value, "item"):
        return _finite(value.item())
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON-serialisable")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
