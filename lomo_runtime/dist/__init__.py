"""Training on several processes with torch.distributed: the process group, the reductions the
fused update needs, and the run's two-phase commit record.

Launch with `torchrun` (one node or many, its own rendezvous flags): rank, world size and the
rendezvous come from the standard environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so any launcher that sets them works the same way. A caller that
initialised a process group already (its own trainer) keeps it; otherwise `Parallel.setup`
initialises one from the environment (gloo on CPU, NCCL on CUDA) and destroys it at `close`.

`replicate` (data parallel): every rank holds every unit in its own store directory
(`<work_dir>/rank-<r>`); each parameter's complete gradient is averaged over the ranks
(`mean_`, an all-reduce issued from the gradient hook) before the fused update, so every rank
applies the same update to the same weights. Gradient hooks fire in the same order on every
rank (same model, same batch shapes), so the collectives pair up without a per-step plan.

One step, one decision: a rank never decides alone. A non-finite loss is agreed on with
`all_true` before backward; a non-finite gradient is seen after the reduction, where every
rank holds the same values; clip norms are computed from reduced gradients.

Commit (two phases, `commit_step`): every rank writes its units and prepares its store's
manifest (`WorkingStore.prepare`); a barrier; rank 0 writes the run's commit record
(`<work_dir>/commit.json`, atomically); a barrier; every rank finishes its prepared manifest.
A crash before the record leaves every rank at the previous step; after it, `open` finishes a
prepared manifest at the recorded step (`WorkingStore.open(committed_step=...)`).

A rank that dies makes the next collective on the others fail (gloo sees the closed
connection) or time out (`timeout_s`); that failure is raised as `PeerLost`, one line naming
the rank whose heartbeat stopped (each rank stamps `lomo/alive/<rank>` in the rendezvous store
every `HEARTBEAT_S`), and the trainer exits non-zero. torchrun also stops the other workers
when one dies, and names it in its own summary.
"""
from __future__ import annotations

import datetime
import json
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from ..errors import LomoError, UserError

MODES = ("replicate", "shard")
COMMIT_RECORD = "commit.json"
HEARTBEAT_S = 2.0
DEFAULT_TIMEOUT_S = 300.0

T = TypeVar("T")


class PeerLost(LomoError):
    """Another rank stopped answering: this rank stops too (the stores are at the last commit)."""

    exit_code = 1


def rank_dir(root: str | os.PathLike, rank: int) -> Path:
    """The store directory of `rank` under a run's work directory."""
    return Path(root) / f"rank-{rank}"


def stop_on_sigterm() -> None:
    """Under a launcher, SIGTERM means another rank failed and the launcher stops the rest
    (torchrun does, and names the failed rank in its summary): say so in one line and exit at
    once. Nothing is lost: the stores are at the last commit, and uncommitted files go at --resume."""
    import signal
    import sys

    def handler(signum, frame):  # noqa: ARG001
        rank = os.environ.get("RANK", "?")
        sys.stderr.write(f"lomo-run: rank {rank}: stopped by the launcher (SIGTERM), usually because another rank "
                         "failed (the launcher's summary names it); the working store is at its last commit: "
                         "continue with --resume\n")
        sys.stderr.flush()
        os._exit(143)

    signal.signal(signal.SIGTERM, handler)


def launched() -> bool:
    """Is this process one of several started by a launcher (WORLD_SIZE set above 1)?"""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class Parallel:
    """This process's place among the ranks, and the collectives the runtime issues."""

    def __init__(self, mode: str, *, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        import torch.distributed as dist

        if mode not in MODES:
            raise UserError(f"parallel must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self._dist = dist
        self.owns_group = False
        if not dist.is_initialized():
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise UserError(
                    f"parallel={mode!r} needs a launcher: {', '.join(missing)} not set; start with "
                    "`torchrun --nproc-per-node=W lomo-run train ...` or initialise torch.distributed first")
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
            self.owns_group = True
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.backend = dist.get_backend()
        # shard: unit reads all-gather on their own group, from the read thread, so they never
        # interleave with the compute thread's gradient all-reduces on the default group.
        self.gather_group = self._call("creating the gather group", lambda: dist.new_group(backend="gloo")) \
            if mode == "shard" else None
        self._what = "startup"
        self._store = self._rendezvous_store()
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None
        if self._store is not None:
            self._beat()
            self._beats = threading.Thread(target=self._heartbeat, name="lomo-heartbeat", daemon=True)
            self._beats.start()

    # ---- what the runtime calls ----------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average `tensor` over the ranks, in place (every rank ends with the same bits)."""
        self._call("a gradient all-reduce", lambda: self._dist.all_reduce(tensor))
        return tensor.div_(self.world)

    def start_sum(self, tensor: torch.Tensor):
        """Begin summing `tensor` over the ranks in place; `wait` on the returned work."""
        return self._call("a gradient all-reduce", lambda: self._dist.all_reduce(tensor, async_op=True))

    def wait(self, work, what: str) -> None:
        self._call(what, work.wait)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place."""
        self._call("an all-reduce", lambda: self._dist.all_reduce(tensor))
        return tensor

    def all_true(self, flag: bool, what: str = "an agreement", group=None) -> bool:
        """True on every rank if `flag` is true on every rank."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        self._call(what, lambda: self._dist.all_reduce(value, op=self._dist.ReduceOp.MIN, group=group))
        return bool(value.item())

    def all_gather_into(self, out: torch.Tensor, mine: torch.Tensor, what: str) -> None:
        """Fill `out` (W equal parts, `mine` being this rank's part of it) with every rank's part,
        on the gather group."""
        parts = list(out.chunk(self.world))
        source = mine.clone()  # gloo copies the input into its own part: never alias the two
        self._call(what, lambda: self._dist.all_gather(parts, source, group=self.gather_group))

    def barrier(self, what: str = "a barrier") -> None:
        self._call(what, lambda: self._dist.barrier())

    def broadcast(self, obj: T, what: str = "a broadcast") -> T:
        """Rank 0's `obj`, on every rank."""
        box = [obj]
        self._call(what, lambda: self._dist.broadcast_object_list(box, src=0))
        return box[0]

    def gather(self, obj: T, what: str = "a gather") -> list[T]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        values: list = [None] * self.world
        self._call(what, lambda: self._dist.all_gather_object(values, obj))
        return values

    def same_everywhere(self, value: Any, what: str) -> None:
        """Raise UserError on every rank unless `value` is equal on all of them."""
        values = self.gather(value, f"comparing {what}")
        if any(v != values[0] for v in values):
            odd = [r for r, v in enumerate(values) if v != values[0]]
            raise UserError(f"ranks disagree on {what}: rank {', '.join(map(str, odd))} differ from rank 0; "
                            "start every rank with the same settings")

    def close(self) -> None:
        self._stop.set()
        if self._beats is not None:
            self._beats.join(timeout=HEARTBEAT_S * 2)
        if self.owns_group and self._dist.is_initialized():
            self._dist.destroy_process_group()
            self.owns_group = False

    # ---- the commit record ---------------------------------------------------------------
    def commit_step(self, root: Path, step: int, prepare: Callable[[], None], finish: Callable[[], None]) -> None:
        """Two-phase commit of `step`: every rank `prepare`s (its slice durable), rank 0 records
        the step in `root/commit.json`, every rank `finish`es."""
        prepare()
        self.barrier(f"the commit of step {step} (phase 1: every rank durable)")
        if self.is_main:
            write_commit_record(root, {"step": int(step), "world_size": self.world, "parallel": self.mode})
        self.barrier(f"the commit of step {step} (phase 2: the record written)")
        finish()

    # ---- failures ------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except LomoError:
            raise
        except Exception as e:  # DistBackendError, RuntimeError from gloo: a peer is gone or hung
            raise PeerLost(self._lost_message(what, e)) from None

    def _lost_message(self, what: str, error: Exception) -> str:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        lost = self._silent_ranks()
        who = (f"rank {', '.join(map(str, lost))} {'is' if len(lost) == 1 else 'are'} lost (no heartbeat)"
               if lost else "another rank is lost or stopped answering")
        return (f"rank {self.rank} of {self.world}: {who}; {what} failed ({first[:200]}). The working store is at "
                "its last commit: fix the cause and continue with --resume")

    def _rendezvous_store(self):
        try:
            from torch.distributed.distributed_c10d import _get_default_store

            return _get_default_store()
        except Exception:  # a caller's group without a store we can reach: no heartbeats
            return None

    def _beat(self) -> None:
        self._store.set(f"lomo/alive/{self.rank}", repr(time.time()))

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:
                return  # the store is gone (its host died): collectives will say so

    def _silent_ranks(self) -> list[int]:
        """Ranks whose heartbeat did not move while we watched for 2.5 intervals (5 s)."""
        if self._store is None:
            return []

        def stamps() -> dict[int, bytes] | None:
            try:
                return {r: self._store.get(f"lomo/alive/{r}") for r in range(self.world) if r != self.rank}
            except Exception:
                return None  # the store itself is unreachable (its host is the lost one): cannot tell

        before = stamps()
        time.sleep(HEARTBEAT_S * 2.5)
        after = stamps()
        if before is None or after is None:
            return []
        return [r for r in before if before[r] == after[r]]


def write_commit_record(root: Path, record: dict[str, Any]) -> None:
    """Write `root/commit.json` atomically (tmp, fsync, rename, fsync dir) with a CRC-32 of itself."""
    data = dict(record)
    data["checksum"] = f"{zlib.crc32(json.dumps(record, sort_keys=True).encode()):08x}"
    tmp = root / (COMMIT_RECORD + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / COMMIT_RECORD)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_commit_record(root: Path) -> dict[str, Any] | None:
    """The run's commit record, or None if there is none (a UserError if it is damaged)."""
    path = root / COMMIT_RECORD
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        stored = data.pop("checksum")
        if stored != f"{zlib.crc32(json.dumps(data, sort_keys=True).encode()):08x}":
            raise ValueError("its checksum does not match its content")
        int(data["step"]), int(data["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is damaged or not a lomo-run commit record: {e}") from None
    return data
