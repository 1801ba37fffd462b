"""Run the inference job on Ray Core, one node agent per node (the inference half of
``pipeline.backend``, the only package that imports Ray).

    driver: shards to do -> leases (many shards each) ----------------> node agent, one per node
            <- batched receipts (progress polls, lease results)          (an actor pinned there)

    node agent, everything on its own node:
      read task (CPU, streaming generator) --unit--> predictor actor --rows--> commit task
          a few shards of a lease                  one unit a call         Parquet + record

A unit is read, predicted and committed on one node: the agent's read tasks, predictor actors
and commits are all pinned to its node (``NodeAffinitySchedulingStrategy``, not soft), so no
unit and no row crosses the network, and none comes back to the driver whatever its size.
The driver's work grows with leases and nodes, not units or rows: per lease one call and one
result, per agent a progress poll every ``POLL_S`` that brings the receipts committed since
the last one (the files, for the summary and the manifest), and a look at the node list every
``NODES_S`` (a node that joins gets an agent and work; a node that drains or dies loses its
leases to the others).

Inside an agent, ``_NodeRunner`` is the loop the driver used to run: it pulls a unit from a
read task when a predictor has room, sends it to the least loaded predictor (ties broken at
random), and once every row of a piece is predicted commits it there.

Exactly once: a read task that dies is retried by Ray, which replays its generator and drops
the units it had already delivered (and the agent ignores a unit it has seen); a predictor that
dies is restarted and the call retried; a commit that dies is retried and rewrites the same
bytes under the same name. An agent that dies (its node preempted or removed, its process
killed) takes its predictors with it (it owns them); its leases are redone by other agents,
with fresh retry budgets: losing a node does not use up the budgets meant for application
errors. Speculative copies near the end race to the same names. The driver keeps one receipt
per file (``LeaseBook``). Output names come from the input, so no attempt can add a file.

Bounded memory: at most ``concurrency + 1`` units per actor are in flight, each read task holds
at most one unit it has not handed over (generator backpressure), commits in flight are capped
per node, and an agent holds ``IN_FLIGHT_PER_AGENT`` leases.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline.backend import metrics
from pipeline.config.errors import JobFailed
from pipeline.io.report import decode_text, fallback_share
from pipeline.io.shards import estimate_rows
from pipeline.stages.commit import CommitSettings, PieceSpec, commit_piece, gather, rows_nbytes
from pipeline.stages.leases import (
    IN_FLIGHT_PER_AGENT,
    LeaseBook,
    Node,
    NodeSlots,
    Placement,
    WorkLease,
    node_slots,
    plan_leases,
    spread_predictors,
)
from pipeline.stages.predictor import (
    DECODE_COLUMN,
    DECODED_ON_DEVICE,
    PredictorSettings,
    decode_counts,
)
from pipeline.stages.reader import Beat, ReaderSettings
from pipeline.stages.units import (
    PieceAssembler,
    ReadTask,
    ShardTask,
    UnitHeader,
    expand_header,
    plan_read_tasks,
    slice_tasks,
)

log = logging.getLogger("pipeline")
_AGENT_GONE: tuple[type, ...] = ()  # Ray's errors for an agent that is gone (set on use)

READ_TASK_RETRIES = 3
ACTOR_RESTARTS = 3
COMMIT_RETRIES = 3
COMMIT_THREADS = 8  # pieces one commit task writes at once (small shards: many files a unit)
PROGRESS_S = 30.0
# The driver's own clock: each costs it ~0.5-1.2 ms of CPU (measured here), so it does them
# seldom and sleeps in between (its cost must stay per lease, not per second or per unit).
POLL_S = 10.0  # asks each agent for its receipts and figures this often
NODES_S = 5.0  # ... and looks at the node list (joined, draining, gone) this often
AGENT_TICK_S = 0.2  # an agent with work notices a new lease or an abandon within this
AGENT_RESTARTS_PER_NODE = 10  # agents started again on a node whose agent died (node alive)
AGENT_THREADS = 16  # calls an agent answers at once: its leases, polls, abandons
# One unit ready and not yet handed over per read task: memory stays bounded however large its
# shards are. Ray 2.60 has no public option for it (Ray Data and Train use this one too);
# tests/test_leases.py fails if the bound stops holding.
GENERATOR_BOUND = {"_generator_backpressure_num_objects": 1}
# Warn when more than this share of the images the predictors decode (--decode gpu) take the
# CPU path: at CPU speed on the actor's one CPU, a GPU then waits for its input.
FALLBACK_WARN_FRACTION = 0.05
FALLBACK_WARN_AFTER = 200  # images decoded before the share means something


@dataclass
class RunStats:
    """Predictor calls and their sizes, the images the predictors decoded, and where the bytes
    went (running figures: nothing kept per unit)."""

    units: int = 0
    calls_with_rows: int = 0
    rows: int = 0
    smallest: int = 0
    largest: int = 0
    device_decoded: int = 0  # images decoded on the predictors' device
    cpu_fallbacks: dict[str, int] = field(default_factory=dict)  # by reason
    unit_bytes: int = 0  # units' bytes from their read task to their predictor
    unit_bytes_cross_node: int = 0  # ... of which between two nodes
    row_bytes: int = 0  # predicted rows' bytes from their predictor to their commit
    row_bytes_cross_node: int = 0
    read_tasks: int = 0  # read tasks the agents cut their leases into
    # Where the time went (the run report): seconds summed over units, and Ray's retries.
    read_s: float = 0.0  # read tasks building units (wall)
    read_cpu_s: float = 0.0  # ... their processes' CPU
    predict_s: float = 0.0  # predictor calls (wall; two at once on a GPU both count)
    read_retries: int = 0  # read tasks Ray ran again (a replay from the start)
    predict_retries: int = 0  # predictor calls Ray ran again (after an actor restart)
    # One predictor process each (a restarted actor is a new one): its running totals as of
    # its latest call (``_Predictor.figures``).
    predictors: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, rows: int, device_decode: Mapping[str, int] | None = None) -> None:
        self.units += 1
        if rows:  # an empty shard's unit says nothing about batch sizes
            self.calls_with_rows += 1
            self.rows += rows
            self.smallest = min(self.smallest, rows) if self.smallest else rows
            self.largest = max(self.largest, rows)
        for outcome, n in (device_decode or {}).items():
            if outcome == DECODED_ON_DEVICE:
                self.device_decoded += n
            else:
                self.cpu_fallbacks[outcome] = self.cpu_fallbacks.get(outcome, 0) + n

    def merge(self, other: RunStats) -> None:
        """Add another agent's figures to these."""
        for name in ("units", "calls_with_rows", "rows", "device_decoded", "unit_bytes",
                     "unit_bytes_cross_node", "row_bytes", "row_bytes_cross_node", "read_tasks"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.smallest:
            self.smallest = min(self.smallest, other.smallest) if self.smallest \
                else other.smallest
        self.largest = max(self.largest, other.largest)
        for reason, n in other.cpu_fallbacks.items():
            self.cpu_fallbacks[reason] = self.cpu_fallbacks.get(reason, 0) + n
        for name in ("read_s", "read_cpu_s", "predict_s", "read_retries", "predict_retries"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for figures in other.predictors.values():
            self.add_predictor(figures)

    def add_timing(self, header, read_attempts: dict[int, int]) -> None:
        """A predicted unit's times and attempts (``read_attempts``: the highest attempt seen
        of each read task, so a replayed task counts its retries once)."""
        self.read_s += header.read_s
        self.read_cpu_s += header.read_cpu_s
        self.predict_s += header.predict_s
        self.predict_retries += header.predict_attempt
        seen = read_attempts.get(header.task, 0)
        if header.read_attempt > seen:
            self.read_retries += header.read_attempt - seen
            read_attempts[header.task] = header.read_attempt
        if header.predictor:
            self.add_predictor(header.predictor)

    def add_predictor(self, figures: Mapping[str, Any]) -> None:
        known = self.predictors.get(figures["id"])
        if known is None or figures["busy_s"] >= known["busy_s"]:
            self.predictors[figures["id"]] = dict(figures)

    def predictor_figures(self, ended: float) -> dict[str, float]:
        """The predictors' busy fraction (time in the model / time held, from the actor's
        start to ``ended``, epoch seconds), GPU-seconds held and CPU-seconds used."""
        held = {k: max(0.0, ended - p["started_at"]) for k, p in self.predictors.items()}
        busy = sum(p["busy_s"] for p in self.predictors.values())
        return {"predictors": len(self.predictors),
                "predictor_restarts": sum(1 for p in self.predictors.values()
                                          if p["restarted"]),
                "busy_s": round(busy, 3),
                "busy_fraction": round(busy / sum(held.values()), 4) if any(held.values())
                else 0.0,
                "gpu_s": round(sum(p["gpus"] * held[k] for k, p in self.predictors.items()), 3),
                "cpu_s": round(sum(p["cpu_s"] for p in self.predictors.values()), 3)}

    def decoded_any(self) -> bool:
        return bool(self.device_decoded or self.cpu_fallbacks)

    def fallback_warning(self) -> str:
        """Whether too many images took the CPU path: the warning to log, or ""."""
        share = fallback_share(self.device_decoded, self.cpu_fallbacks)
        if share <= FALLBACK_WARN_FRACTION:
            return ""
        return (f"{100 * share:.0f} % of the images the predictors decoded took the CPU path "
                f"({decode_text(self.device_decoded, self.cpu_fallbacks)}): PIL on the actor's "
                "CPU, so the GPU may wait for its input (--decode cpu decodes in the read tasks)")

    def call_sizes(self) -> dict[str, float]:
        if not self.calls_with_rows:
            return {}
        return {"min": self.smallest, "mean": round(self.rows / self.calls_with_rows, 1),
                "max": self.largest}

    def cross_node_fractions(self) -> dict[str, float | None]:
        def share(part: int, whole: int) -> float | None:
            return round(part / whole, 4) if whole else None

        return {"cross_node_unit_bytes_fraction": share(self.unit_bytes_cross_node,
                                                        self.unit_bytes),
                "cross_node_row_bytes_fraction": share(self.row_bytes_cross_node,
                                                       self.row_bytes)}


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _attempt() -> int:
    """How many times Ray ran the current task or actor call before this run of it (0: the
    first). Ray 2.60 has no public call for it; its core worker's is used, 0 where missing."""
    try:
        from ray._private.worker import global_worker

        return int(global_worker.core_worker.get_current_task_attempt_number())
    except Exception:  # noqa: BLE001 - a figure for the report, never a reason to fail
        return 0


def _read_units(task: ReadTask, settings: ReaderSettings):
    """The read task: yields each unit as two objects, its header and then its rows, and a
    ``Beat`` now and then while it passes over input without making a unit. The node agent
    fetches the small ones (headers, beats) and hands the rows on by reference, never
    fetching them: it learns what a unit is, and that a read task is moving, without holding
    its pixels."""
    from pipeline.stages.reader import ShardReader

    node, attempt = _node_id(), _attempt()
    if attempt:
        metrics.count("landmarks_retries_total", 1, {"stage": "read"})
    at, started, cpu = time.time(), time.perf_counter(), time.process_time()
    for item in ShardReader(settings).read_task(task, beats=True):
        if isinstance(item, Beat):
            yield item
            continue
        header, rows = item
        seconds = time.perf_counter() - started
        header.read_node, header.read_attempt = node, attempt
        header.started_at, header.read_s = at, seconds
        header.read_cpu_s = time.process_time() - cpu
        metrics.observe("landmarks_read_unit_seconds", seconds)
        metrics.count("landmarks_samples_read_total", header.rows)
        metrics.count("landmarks_input_bytes_total", header.input_bytes)
        metrics.count("landmarks_unit_bytes_total", header.bytes)
        yield header
        yield rows
        # The time waiting to be taken is not the read's.
        at, started, cpu = time.time(), time.perf_counter(), time.process_time()


class _Predictor:
    """The actor around a predictor class: one model per actor, ``(header, rows)`` per unit."""

    def __init__(self, predictor_cls: type, settings: PredictorSettings,
                 weights_data: bytes | None = None):
        """``weights_data``: the model file's bytes, read once by the driver and put in the
        object store once (an argument Ray resolves: every actor, restarted ones included,
        gets those bytes, never a reread of a URI whose file may have changed)."""
        import os

        import ray

        started_at, self.cpu = time.time(), time.process_time()
        context = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray 2.60 reads its own deprecated actor_id in it
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = bool(context.was_current_actor_reconstructed)
        if restarted:
            metrics.count("landmarks_restarts_total", 1, {"stage": "predict"})
        self.figures = {"id": f"{context.get_actor_id()}:{os.getpid()}",
                        "started_at": started_at, "restarted": restarted,
                        "gpus": float(context.get_assigned_resources().get("GPU", 0.0)),
                        "busy_s": 0.0, "cpu_s": 0.0}
        self.predictor = predictor_cls(settings, weights_data)
        self.node = _node_id()
        # Busy time is the union of the calls' spans (two run at once on a GPU).
        self.calls, self.busy_since, self.busy_lock = 0, 0.0, threading.Lock()

    def ready(self) -> bool:
        """Answers once the actor holds its model: only then does it get units."""
        return True

    def predict(self, header: UnitHeader, rows: Mapping[str, Any]):
        attempt = _attempt()
        if attempt:
            metrics.count("landmarks_retries_total", 1, {"stage": "predict"})
        started = self._busy(+1)
        try:
            rows = self.predictor(rows)
        finally:
            ended = self._busy(-1)
        if "source_row" in rows:  # faces found: rows of the unit's rows, one per face
            header = expand_header(header, rows.pop("source_row"))
        if DECODE_COLUMN in rows:  # counted in the header, not written
            header = replace(header, device_decode=decode_counts(rows.pop(DECODE_COLUMN)))
        metrics.observe("landmarks_predict_unit_seconds", ended - started)
        metrics.count("landmarks_rows_predicted_total", header.out_rows)
        for outcome, n in header.device_decode.items():
            if outcome == DECODED_ON_DEVICE:
                metrics.count("landmarks_device_decoded_total", n)
            else:
                metrics.count("landmarks_decode_fallbacks_total", n, {"reason": outcome})
        with self.busy_lock:
            figures = {**self.figures, "cpu_s": time.process_time() - self.cpu}
        return replace(header, predict_node=self.node, out_bytes=rows_nbytes(rows),
                       predict_s=ended - started, predict_attempt=attempt,
                       predictor=figures), rows

    def _busy(self, step: int) -> float:
        """A call starts (+1) or ends (-1); the time any call ran counts as busy once."""
        now = time.perf_counter()
        with self.busy_lock:
            if step > 0 and self.calls == 0:
                self.busy_since = now
            self.calls += step
            if step < 0 and self.calls == 0:
                metrics.count("landmarks_predictor_busy_seconds_total", now - self.busy_since)
                self.figures["busy_s"] += now - self.busy_since
        return now


def _commit(specs: list[PieceSpec], parts: list[list[tuple[int, int, int]]],
            starts: list[float], *units) -> dict[str, Any]:
    """Commit the pieces a unit completed: piece ``i`` is rows ``start:stop`` of
    ``units[u]`` for each ``(u, start, stop)`` in ``parts[i]``, its first read began at
    ``starts[i]`` (epoch seconds). Several pieces (small shards) are written ``COMMIT_THREADS``
    at a time: their PUTs overlap. Returns the receipts and the node that wrote them."""
    attempt = _attempt()
    if attempt:
        metrics.count("landmarks_retries_total", 1, {"stage": "commit"})

    def one(i: int) -> dict[str, Any]:
        receipt = commit_piece(specs[i], gather([units[u] for u, _, _ in parts[i]],
                                                [(a, b) for _, a, b in parts[i]]))
        return {**receipt, "started": round(starts[i], 3), "attempt": attempt}

    started = time.perf_counter()
    if len(specs) == 1:
        receipts = [one(0)]
    else:
        with ThreadPoolExecutor(min(COMMIT_THREADS, len(specs))) as pool:
            receipts = list(pool.map(one, range(len(specs))))
    metrics.observe("landmarks_commit_seconds", time.perf_counter() - started)
    return {"node": _node_id(), "receipts": receipts}


def _warm_commit() -> None:
    """Run once on a commit worker as an agent starts, while its predictors load: the node's
    first commit then finds the commit stage and pyarrow's Parquet writer already imported in a
    pooled worker (a new worker's imports delayed the first file by ~1-2 s on a loaded node)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    import pipeline.stages.commit  # noqa: F401

    pq.write_table(pa.table({"warm": [1]}), io.BytesIO())


class StageFailed(JobFailed):
    """A stage failed for good (after Ray's retries); what was committed stays committed."""


class StageStalled(StageFailed):
    """No unit moved for ``--stall-timeout``: the run stops instead of waiting for ever."""


def _result(ref, what: str, get: Callable | None = None):
    """``ray.get(ref)`` (or ``get(ref)``), with a failure explained as the stage that failed."""
    import ray

    try:
        return get(ref) if get else ray.get(ref)
    except StopIteration:
        raise
    except (ray.exceptions.RayError, OSError) as exc:
        cause = getattr(exc, "cause", None) or exc
        raise StageFailed(f"{what} failed for good ({type(cause).__name__}: "
                          f"{str(cause).strip().splitlines()[-1][:500]}); the files committed "
                          "so far stay, and a rerun does the rest") from exc


def _task_text(task: ReadTask) -> str:
    names = [t.shard.name for t in task.shards]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"the read task of shard(s) {shown}"


class _Stream:
    """A running read task."""

    def __init__(self, task: ReadTask, lease: int, generator):
        self.task, self.lease, self.generator = task, lease, generator
        self.header: UnitHeader | None = None  # taken; its rows are the generator's next


@dataclass
class _Predicted:
    """A predicted unit, as the assembler holds it: where its rows are and came from."""

    ref: Any
    node: str
    out_bytes: int
    out_rows: int
    started_at: float = 0.0  # when its read began (epoch seconds)


@dataclass
class _LeaseState:
    lease: WorkLease
    result: Future
    tasks: list[int] = field(default_factory=list)  # its read tasks' indexes
    ended: int = 0  # read tasks that have ended
    units: int = 0  # units predicting
    commits: int = 0  # commits running
    receipts: list = field(default_factory=list)  # not handed to the driver yet
    seen: dict = field(default_factory=dict)  # task -> units seen (a replayed unit is dropped)
    attempts: dict = field(default_factory=dict)  # task -> its highest attempt seen


class _NodeRunner:
    """One node's loop: a lease's read tasks through the node's predictors to its commits.

    Runs on a thread of the agent actor; the actor's methods talk to it through ``submit``,
    ``abandon`` and ``progress`` (under ``lock``)."""

    def __init__(self, node_id: str, slots: NodeSlots, placement: Placement,
                 reader: ReaderSettings, predictor_cls: type, predictor: PredictorSettings,
                 commit: CommitSettings, stall_timeout: float, weights: list | None = None):
        """``weights``: ``[ObjectRef]`` of the model file's bytes (in a list: Ray resolves only
        a top-level reference, and the agent never needs the bytes themselves), or None."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.node, self.slots = ray, node_id, slots
        self.reader, self.commit_settings = reader, commit
        here = NodeAffinitySchedulingStrategy(node_id, soft=False)
        self.read = ray.remote(_read_units).options(
            num_cpus=slots.read_cpus, max_retries=READ_TASK_RETRIES, scheduling_strategy=here,
            **GENERATOR_BOUND)
        self.commit = ray.remote(_commit).options(num_cpus=slots.commit_cpus,
                                                  max_retries=COMMIT_RETRIES,
                                                  scheduling_strategy=here)
        actor = ray.remote(_Predictor).options(
            num_cpus=placement.actor_cpus, num_gpus=placement.actor_gpus,
            max_concurrency=placement.concurrency, max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_RESTARTS, scheduling_strategy=here)
        self.actors = [actor.remote(predictor_cls, predictor, *(weights or ()))
                       for _ in range(slots.predictors)]
        # Units go only to actors that have started: one Ray cannot place (no GPU free) would
        # hold its units until the stall watchdog fires.
        self.starting = {a.ready.remote(): i for i, a in enumerate(self.actors)}
        self.warm = ray.remote(_warm_commit).options(num_cpus=slots.commit_cpus, max_retries=0,
                                                     scheduling_strategy=here).remote()
        self.started: list[int] = []
        self.load = [0] * len(self.actors)
        self.slots_per_actor = placement.concurrency + 1  # one queued call: never idle
        self.stats = RunStats()
        self.stall_timeout = stall_timeout
        self.rng = random.Random()
        self.lock = threading.Lock()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.leases: dict[int, _LeaseState] = {}
        self.queue: list[ReadTask] = []  # read tasks to start, in order
        self.task_lease: dict[int, int] = {}
        self.streams: list[_Stream] = []
        self.predicting: dict[Any, tuple[int, Any, ReadTask, int]] = {}
        self.commits: dict[Any, tuple[str, int, list[tuple[str, int]]]] = {}
        self.pieces = PieceAssembler()
        self.next_task = 0
        self.failed: dict[str, Any] | None = None
        self.moved = time.monotonic()
        self.thread = threading.Thread(target=self._loop, name="node-runner", daemon=True)
        self.thread.start()

    # -- called from the actor's method threads ---------------------------------------------

    def submit(self, lease: WorkLease) -> Future:
        future: Future = Future()
        with self.lock:
            if self.failed is not None:
                future.set_result(self.failed)
                return future
        self.inbox.put(("lease", lease, future))
        self.wake.set()
        return future

    def abandon(self, lease_id: int) -> None:
        self.inbox.put(("abandon", lease_id, None))
        self.wake.set()

    def progress(self) -> dict[str, Any]:
        with self.lock:
            receipts = []
            for lease_id, state in self.leases.items():
                receipts.extend((lease_id, r) for r in state.receipts)
                state.receipts = []
            metrics.set_gauge("landmarks_units_in_flight",
                              sum(state.units for state in self.leases.values()))
            return {"receipts": receipts, "stats": asdict(self.stats),
                    "moved_s": round(time.monotonic() - self.moved, 3),
                    "leases": len(self.leases), "predicting": len(self.predicting),
                    "commits": len(self.commits), "streams": len(self.streams),
                    "failed": self.failed}

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                self._take_inbox()
                if not self.leases:  # idle: nothing can stall
                    self.moved = time.monotonic()
                    self.wake.wait(1.0)
                    self.wake.clear()
                    continue
                self._step()
        except StageStalled as exc:
            self._fail(str(exc), stalled=True)
        except StageFailed as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug: the driver shows it, the run stops
            log.exception("node agent failed")
            self._fail(f"the node agent failed ({type(exc).__name__}: {exc})")

    def _inbox(self):
        """The leases and abandons sent since the last look: ``(kind, value, future)``."""
        while True:
            try:
                yield self.inbox.get_nowait()
            except queue.Empty:
                return

    def _take_inbox(self) -> None:
        for kind, value, future in self._inbox():
            if kind == "lease":
                self._add_lease(value, future)
            else:
                self._abandon(value)

    def _add_lease(self, lease: WorkLease, future: Future) -> None:
        state = _LeaseState(lease, future)
        tasks = plan_read_tasks(lease.shards, min_tasks=self.slots.max_reads)
        # Fewer tasks than read lanes (a few big shards): slices of them fill the lanes.
        tasks = slice_tasks(tasks, self.slots.max_reads, self._rows_of,
                            min_rows=self.reader.unit_rows)
        for task in tasks:
            task = ReadTask(self.next_task, task.shards)
            self.next_task += 1
            self.stats.read_tasks += 1
            state.tasks.append(task.index)
            self.task_lease[task.index] = lease.id
            self.queue.append(task)
        if not self.leases:
            self.moved = time.monotonic()  # the stall clock starts with the work
        with self.lock:
            self.leases[lease.id] = state
        self._maybe_done(lease.id)  # a lease of nothing (cannot happen) ends at once

    def _rows_of(self, shard) -> int | None:
        return estimate_rows(shard, self.reader.storage_options)

    def _abandon(self, lease_id: int) -> None:
        """Another attempt finished this lease first: stop reading it and drop its work."""
        state = self.leases.get(lease_id)
        if state is None:
            return
        self.queue = [t for t in self.queue if self.task_lease.get(t.index) != lease_id]
        for stream in [s for s in self.streams if s.lease == lease_id]:
            self.streams.remove(stream)
            with contextlib.suppress(Exception):
                self.ray.cancel(stream.generator, force=True)
        for key in [k for k in self.pieces.open if k[0][0] == lease_id]:
            del self.pieces.open[key]
        self._close(lease_id, {"lease": lease_id, "abandoned": True, "receipts": []})

    def _close(self, lease_id: int, result: dict[str, Any]) -> None:
        with self.lock:
            state = self.leases.pop(lease_id)
        for task in state.tasks:
            self.task_lease.pop(task, None)
        state.result.set_result(result)

    def _fail(self, message: str, stalled: bool = False) -> None:
        """Stop: every lease held (and every later one) ends with this failure."""
        failed = {"failed": message, "stalled": stalled, "receipts": []}
        with self.lock:
            self.failed = failed
            leases, self.leases = self.leases, {}
        for state in leases.values():
            state.result.set_result({**failed, "lease": state.lease.id,
                                     "receipts": state.receipts})
        for stream in self.streams:
            with contextlib.suppress(Exception):
                self.ray.cancel(stream.generator, force=True)
        for _, value, future in self._inbox():  # leases that arrived meanwhile
            if future is not None:
                future.set_result({**failed, "lease": value.id})

    def _step(self) -> None:
        ray = self.ray
        while self.queue and len(self.streams) < self.slots.max_reads:
            task = self.queue.pop(0)
            self.streams.append(_Stream(task, self.task_lease[task.index],
                                        self.read.remote(task, self.reader)))
        room = (any(self.load[a] < self.slots_per_actor for a in self.started)
                and len(self.commits) < self.slots.max_commits)
        waiting = [*self.starting, *self.predicting, *self.commits,
                   *(s.generator for s in self.streams if room)]
        if waiting:
            # fetch_local=False: readiness only; never pull a unit here before it is used.
            ready, _ = ray.wait(waiting, num_returns=1, timeout=AGENT_TICK_S,
                                fetch_local=False)
        else:
            ready = []
            self.wake.wait(AGENT_TICK_S)
            self.wake.clear()
        for ref in ready:
            if ref in self.starting:
                self._actor_started(ref)
            elif ref in self.commits:
                self._receipt(ref)
            elif ref in self.predicting:
                self._predicted(ref)
            else:
                stream = next((s for s in self.streams if s.generator == ref), None)
                if stream is not None:
                    self._next_unit(stream)
        if time.monotonic() - self.moved > self.stall_timeout:
            raise StageStalled(self._stalled())

    def _stalled(self) -> str:
        """Which stage stopped moving, and what every stage holds: logged, and the error."""
        if not self.started:
            stage = (f"the predict stage: none of the {len(self.actors)} predictor actor(s) "
                     "started (does the cluster have the GPUs and CPUs they ask for free?)")
        elif self.predicting:
            stage = (f"the predict stage: {len(self.predicting)} unit(s) sent to the predictor "
                     f"actors got no answer")
        elif self.commits:
            stage = f"the commit stage: {len(self.commits)} commit(s) never returned"
        else:
            stage = f"the read stage: {len(self.streams)} read task(s) yielded no unit"
        lines = [f"node {self.node[:12]}: read tasks: {len(self.streams)} running "
                 f"({'; '.join(_task_text(s.task) for s in self.streams[:3]) or '-'}), "
                 f"{len(self.queue)} waiting",
                 f"predictor actors: {len(self.actors)} ({len(self.started)} started), units in "
                 f"flight per actor {self.load}{self._actor_states()}",
                 f"commits running: {len(self.commits)} "
                 f"({'; '.join(c[0] for c in list(self.commits.values())[:3]) or '-'})",
                 f"pieces open: {len(self.pieces.open)}"]
        for line in lines:
            log.error("stalled: %s", line)
        return (f"no unit moved for {self.stall_timeout:g} s (--stall-timeout): stalled in "
                f"{stage}. {'; '.join(lines)}. The files committed so far stay; a rerun "
                "resumes")

    def _actor_states(self) -> str:
        """The predictor actors' states from Ray's state API, when it answers."""
        try:
            from ray.util.state import list_actors

            actors = list_actors(filters=[("class_name", "=", "_Predictor")], timeout=5,
                                 raise_on_missing_output=False)
            return "; states " + ", ".join(sorted(a.state for a in actors))
        except Exception:  # no dashboard (a bare local Ray): the counts above must do
            return ""

    def _next_unit(self, stream: _Stream) -> None:
        """Take a read task's next object: a unit's header (fetched: small), then its rows
        (sent by reference to the least loaded predictor with the header), or a beat."""
        what = _task_text(stream.task)
        try:
            ref = _result(stream.generator, what, next)
        except StopIteration:
            self.streams.remove(stream)
            state = self.leases.get(stream.lease)
            if state is not None:
                state.ended += 1
                self._maybe_done(stream.lease)
            return
        if stream.header is None:
            item = _result(ref, what)
            if isinstance(item, Beat):  # passing over done input: moving, no unit yet
                self.moved = time.monotonic()
            else:
                stream.header = item
            return
        header, rows_ref, stream.header = stream.header, ref, None
        least = min(self.load[a] for a in self.started)
        actor = self.rng.choice([a for a in self.started if self.load[a] == least])
        header_ref, rows_ref = self.actors[actor].predict.options(num_returns=2).remote(
            header, rows_ref)
        self.load[actor] += 1
        self.predicting[header_ref] = (actor, rows_ref, stream.task, stream.lease)
        self.leases[stream.lease].units += 1

    def _actor_started(self, ref) -> None:
        """A predictor actor holds its model (or failed to load it: the run stops)."""
        actor = self.starting.pop(ref)
        _result(ref, "a predictor actor")
        self.started.append(actor)

    def _predicted(self, header_ref) -> None:
        """A unit is predicted: add it to its pieces and commit every piece now complete."""
        actor, rows_ref, task, lease_id = self.predicting.pop(header_ref)
        self.load[actor] -= 1
        self.moved = time.monotonic()
        state = self.leases.get(lease_id)
        if state is None:  # abandoned meanwhile
            return
        state.units -= 1
        header = _result(header_ref, "a predictor actor")
        with self.lock:  # work done, even for a unit delivered twice
            self.stats.add_timing(header, state.attempts)
        seen = state.seen.setdefault(header.task, set())
        if header.index in seen:
            self._maybe_done(lease_id)
            return  # a unit delivered twice is committed once
        seen.add(header.index)
        with self.lock:  # progress() reads them from another thread
            self.stats.add(header.out_rows, header.device_decode)
            self.stats.unit_bytes += header.bytes
            if header.read_node != header.predict_node:
                self.stats.unit_bytes_cross_node += header.bytes
        unit = _Predicted(rows_ref, header.predict_node, header.out_bytes, header.out_rows,
                          header.started_at)
        # Pieces are keyed by lease and shard: a sliced shard's pieces gather rows from
        # several read tasks.
        ready = self.pieces.add(header, unit,
                                lambda i: (lease_id, task.shards[i].shard.name))
        if ready:  # one commit task for every piece this unit completed
            units: dict[int, tuple[int, _Predicted]] = {}  # id -> (argument index, unit)
            specs, parts, moved, starts = [], [], [], []
            for piece in ready:
                starts.append(min(u.started_at for u, _ in piece.parts))
                specs.append(self.commit_settings.spec(task.shards[piece.shard].shard,
                                                       piece.piece, piece.last))
                parts.append([(units.setdefault(id(u), (len(units), u))[0], start, stop)
                              for u, (start, stop) in piece.parts])
                moved.extend((u.node, u.out_bytes * (stop - start) // max(1, u.out_rows))
                             for u, (start, stop) in piece.parts)
            receipts = self.commit.remote(specs, parts, starts,
                                          *(u.ref for _, u in units.values()))
            self.commits[receipts] = (specs[0].stem if len(specs) == 1
                                      else f"{specs[0].stem} and {len(specs) - 1} more",
                                      lease_id, moved)
            state.commits += 1
        self._maybe_done(lease_id)

    def _receipt(self, ref) -> None:
        stems, lease_id, moved = self.commits.pop(ref)
        self.moved = time.monotonic()
        state = self.leases.get(lease_id)
        if state is None:  # abandoned meanwhile: the winner's receipts count
            return
        state.commits -= 1
        out = _result(ref, f"the commit of piece(s) {stems}")
        with self.lock:
            for node, nbytes in moved:
                self.stats.row_bytes += nbytes
                if node != out["node"]:
                    self.stats.row_bytes_cross_node += nbytes
            for receipt in out["receipts"]:  # where each file was written, in the manifest
                receipt["node"] = out["node"]
            state.receipts.extend(out["receipts"])
        self._maybe_done(lease_id)

    def _maybe_done(self, lease_id: int) -> None:
        """Close a lease whose read tasks ended and whose units are all committed."""
        state = self.leases.get(lease_id)
        if state is None or state.ended < len(state.tasks) or state.units or state.commits:
            return
        open_pieces = [k for k in self.pieces.open if k[0][0] == lease_id]
        if open_pieces:
            raise RuntimeError(f"{len(open_pieces)} piece(s) never received all their rows "
                               f"(e.g. {open_pieces[0]}): their files were not written; rerun "
                               "the job to redo them")
        with self.lock:
            receipts, state.receipts = state.receipts, []
            stats = asdict(self.stats)
        self._close(lease_id, {"lease": lease_id, "receipts": receipts, "stats": stats})


class _NodeAgent:
    """The actor that runs one node's share of the job (``_NodeRunner``), pinned to it."""

    def __init__(self, node_id: str, slots: NodeSlots, *args):
        self.runner = _NodeRunner(node_id, slots, *args)

    def ready(self) -> str:
        return self.runner.node

    def run_lease(self, lease: WorkLease) -> dict[str, Any]:
        """Read, predict and commit every shard of ``lease``; answers when all are committed
        (with their receipts not yet polled), abandoned, or the agent failed."""
        return self.runner.submit(lease).result()

    def progress(self) -> dict[str, Any]:
        return self.runner.progress()

    def abandon(self, lease_id: int) -> None:
        self.runner.abandon(lease_id)


@dataclass
class _Agent:
    """The driver's view of one agent."""

    node: str
    actor: Any
    predictors: int
    leases: list = field(default_factory=list)  # refs of its lease calls
    poll: Any = None  # its outstanding progress call
    polled: float = 0.0
    stats: RunStats = field(default_factory=RunStats)
    draining: bool = False


def _agent_gone_errors() -> tuple[type, ...]:
    """What a call to an agent raises when the agent or its node is gone."""
    import ray.exceptions as rex

    return (rex.RayActorError, rex.NodeDiedError, rex.ObjectLostError, rex.OwnerDiedError)


def _cluster_nodes() -> list[Node]:
    """Alive nodes and whether each is draining (Ray's autoscaler or a preemption notice)."""
    import ray

    draining = _draining_nodes()
    return [Node(n["NodeID"], float(n["Resources"].get("CPU", 0)),
                 float(n["Resources"].get("GPU", 0)), n["NodeID"] in draining)
            for n in ray.nodes() if n.get("Alive")]


def _draining_nodes() -> set[str]:
    """The nodes Ray is draining (``DrainNode``: the autoscaler taking a node down, a KubeRay
    pod being deleted); empty when the GCS does not say."""
    try:
        from ray._private.state import state  # no public call in Ray 2.60 (ray issue 63968)

        return set(state.get_draining_nodes())
    except Exception:  # an older or newer Ray without that call: deaths still count
        return set()


class LeaseRunner:
    """The driver: node agents, leases from one queue, receipts in batches."""

    def __init__(self, placement: Placement, reader: ReaderSettings,
                 predictor_cls: type, predictor: PredictorSettings, commit: CommitSettings,
                 on_receipts: Callable[[list[dict[str, Any]]], None],
                 stall_timeout: float = 900.0, seed: int | None = None,
                 weights_data: bytes | None = None):
        """``weights_data``: the model file's bytes (read once by the job), put in the object
        store here once and given to every predictor actor."""
        import ray

        global _AGENT_GONE
        _AGENT_GONE = _agent_gone_errors()
        self.ray = ray
        self.placement = placement
        weights = [ray.put(weights_data)] if weights_data is not None else None
        self.agent_args = (placement, reader, predictor_cls, predictor, commit, stall_timeout,
                           weights)
        self.on_receipts, self.stall_timeout = on_receipts, stall_timeout
        self.agent_cls = ray.remote(_NodeAgent)
        self.rng = random.Random(seed)
        self.agents: dict[str, _Agent] = {}
        self.restarts: dict[str, int] = {}
        self.gone: list[RunStats] = []  # figures of agents that died
        self.rows = 0
        self.known_nodes: set[str] = set()
        self.refresh = False  # look at the nodes now (an agent was lost)
        # Set for each run (``run``):
        self.book: LeaseBook | None = None  # the leases and who holds them
        self.calls: dict[Any, _Agent] = {}  # lease call ref -> agent
        self.polls: dict[Any, _Agent] = {}  # progress poll ref -> agent
        self.moved = 0.0  # when a unit last moved (monotonic): the stall watchdog's clock
        self.events: dict[str, int] = {"agents_started": 0, "agents_lost": 0,
                                       "agents_preempted": 0, "nodes_joined": 0, "nodes_drained": 0}

    # -- agents --------------------------------------------------------------------------

    def _want(self, nodes: list[Node]) -> int:
        if not self.placement.elastic:
            return self.placement.count
        # Every GPU the cluster has now, one actor each (GPU runs only).
        return sum(int(n.gpus / self.placement.actor_gpus + 1e-9) for n in nodes)

    def _place(self, nodes: list[Node]) -> None:
        """Start agents so that the wanted predictors run, on the nodes that have room."""
        have = {node: a.predictors for node, a in self.agents.items()}
        share = spread_predictors(nodes, self._want(nodes), self.placement.actor_cpus,
                                  self.placement.actor_gpus, have, self.rng)
        by_id = {n.id: n for n in nodes}
        for node_id, predictors in share.items():
            if node_id in self.agents or node_id not in by_id:
                continue
            if self.restarts.get(node_id, -1) >= AGENT_RESTARTS_PER_NODE:
                continue  # its agents keep dying: the other nodes do the work
            self.restarts[node_id] = self.restarts.get(node_id, -1) + 1
            if self.restarts[node_id]:
                metrics.count("landmarks_restarts_total", 1, {"stage": "agent"})
            slots = node_slots(by_id[node_id], predictors, self.placement.actor_cpus)
            actor = self.agent_cls.options(
                num_cpus=0, max_concurrency=AGENT_THREADS, max_restarts=0,
                scheduling_strategy=self._pin(node_id)).remote(node_id, slots, *self.agent_args)
            self.agents[node_id] = _Agent(node_id, actor, predictors,
                                          polled=time.monotonic())
            self.events["agents_started"] += 1
            log.info("node agent on %s: %d predictor(s), %d read task(s) and %d commit(s) at "
                     "once", node_id[:12], predictors, slots.max_reads, slots.max_commits)

    @staticmethod
    def _pin(node_id: str):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(node_id, soft=False)

    def _agent_died(self, agent: _Agent, exc: Exception) -> None:
        """A call to ``agent`` failed because it is gone: its process or node died (its leases
        go back to the queue), or it could not start (a bug: the run stops)."""
        if getattr(exc, "actor_init_failed", False):
            raise StageFailed(f"a node agent could not start ({str(exc).strip()[-500:]}); "
                              "the files committed so far stay, and a rerun does the rest")
        if getattr(exc, "preempted", False):
            self.events["agents_preempted"] += 1
        self._lose_agent(agent, type(exc).__name__)

    def _lose_agent(self, agent: _Agent, why: str) -> None:
        """An agent died (or its node is gone): its leases go back to the queue."""
        if self.agents.get(agent.node) is not agent:
            return
        del self.agents[agent.node]
        self.events["agents_lost"] += 1
        self.gone.append(agent.stats)
        for key in agent.leases:
            self.calls.pop(key, None)
            self.book.lose(key)
        self.refresh = True  # place its predictors again (on its node, if it is alive)
        log.warning("node agent on %s lost (%s): %d lease(s) go back to the queue",
                    agent.node[:12], why, len(agent.leases))
        with contextlib.suppress(Exception):
            self.ray.kill(agent.actor)

    def _refresh_nodes(self) -> None:
        nodes = _cluster_nodes()
        alive = {n.id: n for n in nodes}
        for agent in list(self.agents.values()):
            node = alive.get(agent.node)
            if node is None:
                self._lose_agent(agent, "its node is gone")
            elif node.draining:
                self._mark_draining(agent)
        known = set(self.known_nodes)
        self.known_nodes = set(alive)
        if known and set(alive) - known:
            self.events["nodes_joined"] += len(set(alive) - known)
        self._place(nodes)

    # -- the loop ------------------------------------------------------------------------

    def run(self, todo: list[ShardTask]) -> RunStats:
        """Run every shard to its commits; returns the predictors' figures."""
        ray = self.ray
        self._refresh_nodes()
        if not self.agents:
            raise StageFailed("no node of the Ray cluster can hold a predictor actor (with "
                              f"{self.placement.actor_cpus:g} CPU and "
                              f"{self.placement.actor_gpus:g} GPU each)")
        leases = plan_leases(todo, len(self.agents))
        self.book = LeaseBook(leases, spread=len(self.agents) * IN_FLIGHT_PER_AGENT)
        self.calls, self.polls = {}, {}
        log.info("%d shard(s) in %d lease(s) for %d node agent(s)", len(todo), len(leases),
                 len(self.agents))
        started = last_log = last_nodes = self.moved = time.monotonic()
        try:
            while not self.book.finished:
                now = time.monotonic()
                if now - last_nodes >= NODES_S or self.refresh:
                    last_nodes, self.refresh = now, False
                    self._refresh_nodes()
                self._hand_out()
                self._poll(now)
                waiting = [*self.calls, *self.polls]
                # Sleep until an answer comes or the next poll, node check or log line is due.
                due = min([last_nodes + NODES_S, last_log + PROGRESS_S,
                           *(a.polled + POLL_S for a in self.agents.values() if a.poll is None)])
                timeout = min(max(0.05, due - time.monotonic()), NODES_S)
                if waiting:
                    ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
                else:
                    ready = []
                    time.sleep(timeout)
                for ref in ready:
                    if ref in self.calls:
                        self._lease_result(ref)
                    elif ref in self.polls:
                        self._polled(ref)
                self._check_stall(len(todo))
                if time.monotonic() - last_log >= PROGRESS_S:
                    last_log = time.monotonic()
                    stats = self.stats()
                    log.info("... %d/%d lease(s) done, %d rows committed (%.1f rows/s), %d "
                             "node agent(s), %d lease(s) running%s", len(self.book.done),
                             len(leases), self.rows, self.rows / (last_log - started),
                             len(self.agents), len(self.book.attempts),
                             f"; {decode_text(stats.device_decoded, stats.cpu_fallbacks)}"
                             if stats.decoded_any() else "")
            for ref in list(self.polls):  # receipts polled before the last lease result
                self._polled(ref)
            self._final_poll()
            return self.stats()
        finally:
            for agent in self.agents.values():  # give the GPUs back now (predictors go too)
                with contextlib.suppress(Exception):
                    ray.kill(agent.actor)

    def stats(self) -> RunStats:
        total = RunStats()
        for stats in [*self.gone, *(a.stats for a in self.agents.values())]:
            total.merge(stats)
        return total

    def lease_figures(self) -> dict[str, int]:
        book = self.book
        return {"leases": len(book.leases), "leases_lost": book.lost,
                "agent_restarts": sum(n for n in self.restarts.values() if n > 0),
                "leases_speculated": book.speculated,
                "leases_won_by_speculation": book.won_by_speculation, **self.events}

    def _hand_out(self) -> None:
        """Give leases to agents with room, the least busy first (ties at random); once the
        queue is empty, an idle agent takes a copy of a lease that runs long elsewhere. A
        draining node's agent gets none, and goes once it holds none (the node can go)."""
        for agent in [a for a in self.agents.values() if a.draining and not a.leases]:
            del self.agents[agent.node]
            self.gone.append(agent.stats)
            with contextlib.suppress(Exception):
                self.ray.kill(agent.actor)
        agents = [a for a in self.agents.values() if not a.draining]
        self.rng.shuffle(agents)  # ties go to no agent in particular
        drained = [k for a in self.agents.values() if a.draining for k in a.leases]
        while True:  # one lease at a time to the agent holding fewest
            room = [a for a in agents if len(a.leases) < IN_FLIGHT_PER_AGENT]
            if not room:
                return
            agent = min(room, key=lambda a: len(a.leases))
            lease, speculative = self.book.take(agent.node), False
            if lease is None:  # a draining node's leases first, then the slowest
                lease = self._copy_of(drained, agent) or (
                    None if agent.leases else self.book.to_speculate(agent.node))
                speculative = lease is not None
            if lease is None:
                agents.remove(agent)  # nothing for it now
                continue
            ref = agent.actor.run_lease.remote(lease)
            self.book.started(ref, lease, agent.node, speculative)
            agent.leases.append(ref)
            self.calls[ref] = agent

    def _copy_of(self, drained: list, agent: _Agent) -> WorkLease | None:
        """A lease running on a draining node and not yet copied: start it here too."""
        for key in drained:
            if key not in self.book.attempts:
                continue
            lease = self.book.lease_of(key)
            if sum(1 for a in self.book.attempts.values() if a.lease == lease) == 1:
                return self.book.by_id[lease]
        return None

    def _poll(self, now: float) -> None:
        for agent in self.agents.values():
            if agent.poll is None and now - agent.polled >= POLL_S:
                agent.poll = agent.actor.progress.remote()
                agent.polled = now
                self.polls[agent.poll] = agent

    def _polled(self, ref) -> None:
        agent = self.polls.pop(ref)
        agent.poll = None
        try:
            report = self.ray.get(ref)
        except _AGENT_GONE as exc:
            self._agent_died(agent, exc)
            return
        self._take(report)
        agent.stats = RunStats(**report["stats"])
        if report["moved_s"] < self.stall_timeout:
            self.moved = max(self.moved, time.monotonic() - report["moved_s"])

    def _take(self, report: Mapping[str, Any]) -> None:
        """Receipts from an agent, each file once."""
        by_lease: dict[int, list] = {}
        for lease, receipt in report["receipts"]:
            by_lease.setdefault(lease, []).append(receipt)
        for lease, receipts in by_lease.items():
            self._receive(lease, receipts)

    def _receive(self, lease: int, receipts: list) -> None:
        new = self.book.receipts(lease, receipts)
        if new:
            self.moved = time.monotonic()
            self.rows += sum(r["rows"] for r in new)
            self.on_receipts(new)

    def _lease_result(self, ref) -> None:
        agent = self.calls.pop(ref)
        with contextlib.suppress(ValueError):
            agent.leases.remove(ref)
        try:
            result = self.ray.get(ref)
        except _AGENT_GONE as exc:
            agent.leases.append(ref)  # lost with the agent, with its other leases
            self._agent_died(agent, exc)
            return
        if result.get("abandoned"):
            return
        if "failed" in result:
            if self._node_going(agent):  # the node is going: not the job's fault
                agent.leases.append(ref)
                self._lose_agent(agent, "its node is going away")
                return
            raise (StageStalled if result["stalled"] else StageFailed)(result["failed"])
        self._receive(result["lease"], result["receipts"])
        agent.stats = RunStats(**result["stats"])
        first, others = self.book.finish(ref)
        self.moved = time.monotonic()
        for key in others:  # a speculative race: the loser stops, its work is dropped
            loser = self.calls.pop(key, None)
            self.book.abandon(key)
            if loser is not None:
                with contextlib.suppress(ValueError):
                    loser.leases.remove(key)
                loser.actor.abandon.remote(result["lease"])

    def _node_going(self, agent: _Agent) -> bool:
        """Whether ``agent``'s node is gone or draining (Ray then refuses new tasks there)."""
        node = {n.id: n for n in _cluster_nodes()}.get(agent.node)
        if node is not None and node.draining:
            self._mark_draining(agent)
        return node is None or node.draining

    def _mark_draining(self, agent: _Agent) -> None:
        """``agent``'s node drains: it gets no more leases, its leases are copied elsewhere."""
        if not agent.draining:
            agent.draining = True
            self.events["nodes_drained"] += 1
            log.warning("node %s is draining: its %d lease(s) are started elsewhere too",
                        agent.node[:12], len(agent.leases))

    def _check_stall(self, shards: int) -> None:
        """The driver's own watchdog, over the agents: an agent that does not answer its
        progress call, or no agent able to run (every node gone)."""
        now = time.monotonic()
        for agent in self.agents.values():
            if agent.poll is not None and now - agent.polled > self.stall_timeout:
                raise StageStalled(
                    f"no unit moved for {self.stall_timeout:g} s (--stall-timeout): stalled in "
                    f"the node agent on {agent.node[:12]}, which did not answer for "
                    f"{now - agent.polled:.0f} s. The files committed so far stay; a rerun "
                    "resumes")
        if now - self.moved > self.stall_timeout and not self.agents:
            raise StageStalled(
                f"no unit moved for {self.stall_timeout:g} s (--stall-timeout): no node agent "
                f"runs (no alive node can hold a predictor); {len(self.book.done)}/"
                f"{len(self.book.leases)} lease(s) of {shards} shard(s) done. The files "
                "committed so far stay; a rerun resumes")

    def _final_poll(self) -> None:
        """The agents' last figures (and any receipt not handed over yet)."""
        calls = {a.actor.progress.remote(): a for a in self.agents.values()}
        for ref, agent in calls.items():
            try:
                report = self.ray.get(ref, timeout=30)
            except Exception as exc:  # noqa: BLE001 - gone at the end: its figures so far
                log.warning("node agent on %s did not report at the end (%s)", agent.node[:12],
                            type(exc).__name__)
                continue
            self._take(report)
            agent.stats = RunStats(**report["stats"])
