"""Run the inference job's units on Ray Core (the inference half of ``pipeline.backend``, the only
package that imports Ray).

    read task (CPU, streaming generator) --unit--> predictor actor (GPU) --rows--> commit task
          per read task: a few shards                per call: one unit         per piece:
          yields one unit at a time                  returns (header, rows)     Parquet + record

The driver moves object references, never rows: it pulls a unit reference from a read task when
a predictor has room for it, sends it to the least loaded actor, receives the unit's header back
(which pieces its rows belong to), and when every row of a piece has been predicted submits the
piece's commit with the references of the units that hold it. Per unit that is a handful of Ray
calls (~7-10 ms of driver CPU measured on a simulated 5-node cluster, most of it Ray's client
threads), so units of thousands of rows keep the driver far below a core however many GPUs
there are; it keeps only counters and the pieces still open.

Why not Ray Data: its blocks are merged and split by size, so a unit would not stay together from
read to commit without a regrouping step (the driver-side collector this replaced), and its
executor costs 13-17 ms of driver CPU per task (measured here) on top of that.

Exactly once: a read task that dies is retried by Ray, which replays its generator and drops the
units it had already delivered (and the driver also ignores a unit it has seen); a predictor that
dies is restarted and the call retried; a commit that dies is retried and rewrites the same
bytes under the same name. Output names come from the input, so no retry can add a file.

Bounded memory: at most ``concurrency + 1`` units per actor are in flight, each read task holds
at most one unit it has not handed over (generator backpressure), and commits in flight are
capped; the read task count is planned so that commits always find a CPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.io.report import decode_text, fallback_share
from pipeline.stages.commit import PieceSpec, commit_piece, gather
from pipeline.stages.predictor import DECODE_COLUMN, DECODED_ON_DEVICE, decode_counts
from pipeline.stages.units import PieceAssembler, ReadTask, expand_header

log = logging.getLogger("pipeline")

READ_TASK_RETRIES = 3
ACTOR_RESTARTS = 3
COMMIT_RETRIES = 3
COMMIT_THREADS = 8  # pieces one commit task writes at once (small shards: many files a unit)
PROGRESS_S = 30.0
# Warn when more than this share of the images the predictors decode (--decode gpu) take the
# CPU path: at CPU speed on the actor's one CPU, a GPU then waits for its input.
FALLBACK_WARN_FRACTION = 0.05
FALLBACK_WARN_AFTER = 200  # images decoded before the share means something


@dataclass(frozen=True)
class Placement:
    """How many of each worker, with which resources (``pipeline.inference.job.plan``)."""

    pool_size: int
    actor_cpus: float
    actor_gpus: float
    concurrency: int
    max_reads: int
    read_cpus: float
    max_commits: int
    commit_cpus: float


@dataclass
class RunStats:
    """Predictor calls and their sizes, and the images the predictors decoded (running
    figures: nothing kept per unit)."""

    units: int = 0
    calls_with_rows: int = 0
    rows: int = 0
    smallest: int = 0
    largest: int = 0
    device_decoded: int = 0  # images decoded on the predictors' device
    cpu_fallbacks: dict[str, int] = field(default_factory=dict)  # by reason

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


def _read_units(task: ReadTask, reader_kwargs: Mapping[str, Any]):
    from pipeline.stages.reader import ShardReader

    for header, rows in ShardReader(**reader_kwargs).read_task(task):
        yield {"header": header, "rows": rows}


class _Predictor:
    """The actor around a predictor class: one model per actor, ``(header, rows)`` per unit."""

    def __init__(self, predictor_cls: type, kwargs: Mapping[str, Any]):
        self.predictor = predictor_cls(**kwargs)

    def ready(self) -> bool:
        """Answers once the actor holds its model: only then does it get units."""
        return True

    def predict(self, unit: Mapping[str, Any]):
        rows = self.predictor(unit["rows"])
        header = unit["header"]
        if "source_row" in rows:  # faces found: rows of the unit's rows, one per face
            header = expand_header(header, rows.pop("source_row"))
        if DECODE_COLUMN in rows:  # counted in the header, not written
            header = replace(header, device_decode=decode_counts(rows.pop(DECODE_COLUMN)))
        return header, rows


def _commit(specs: list[PieceSpec], parts: list[list[tuple[int, int, int]]], *units
            ) -> list[dict[str, Any]]:
    """Commit the pieces a unit completed: piece ``i`` is rows ``start:stop`` of
    ``units[u]`` for each ``(u, start, stop)`` in ``parts[i]``. Several pieces (small shards)
    are written ``COMMIT_THREADS`` at a time: their PUTs overlap."""
    def one(i: int) -> dict[str, Any]:
        return commit_piece(specs[i], gather([units[u] for u, _, _ in parts[i]],
                                             [(a, b) for _, a, b in parts[i]]))

    if len(specs) == 1:
        return [one(0)]
    with ThreadPoolExecutor(min(COMMIT_THREADS, len(specs))) as pool:
        return list(pool.map(one, range(len(specs))))


class StageFailed(RuntimeError):
    """A stage failed for good (after Ray's retries); what was committed stays committed."""

    stops_job = True  # the command line says it in one line and exits 1


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

    def __init__(self, task: ReadTask, generator):
        self.task, self.generator = task, generator


class UnitRunner:
    """Drives one job's read tasks, predictor actors and commits until every piece is in."""

    def __init__(self, placement: Placement, reader_kwargs: Mapping[str, Any],
                 predictor_cls: type, predictor_kwargs: Mapping[str, Any],
                 piece_spec: Callable[[ReadTask, int, int, bool], PieceSpec],
                 on_receipt: Callable[[dict[str, Any]], None], stall_timeout: float = 900.0):
        import ray

        self.ray = ray
        self.placement, self.reader_kwargs = placement, dict(reader_kwargs)
        self.piece_spec, self.on_receipt = piece_spec, on_receipt
        self.read = ray.remote(_read_units).options(
            num_cpus=placement.read_cpus, max_retries=READ_TASK_RETRIES,
            # One unit ready and not yet handed over per read task: memory stays bounded
            # however large its shards are.
            _generator_backpressure_num_objects=1)
        self.commit = ray.remote(_commit).options(num_cpus=placement.commit_cpus,
                                                  max_retries=COMMIT_RETRIES)
        actor = ray.remote(_Predictor).options(
            num_cpus=placement.actor_cpus, num_gpus=placement.actor_gpus,
            max_concurrency=placement.concurrency, max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_RESTARTS)
        self.actors = [actor.remote(predictor_cls, dict(predictor_kwargs))
                       for _ in range(placement.pool_size)]
        # Units go only to actors that have started: one Ray cannot place (no GPU free) would
        # hold its units until the stall watchdog fires.
        self.starting = {a.ready.remote(): i for i, a in enumerate(self.actors)}
        self.started: list[int] = []
        self.load = [0] * len(self.actors)
        self.slots = placement.concurrency + 1  # one queued call: the actor never waits on us
        self.stats = RunStats()
        self.stall_timeout = stall_timeout

    def run(self, tasks: list[ReadTask]) -> RunStats:
        """Run every read task's units to their commits; returns call statistics."""
        ray = self.ray
        self.queue = list(reversed(tasks))
        self.streams: list[_Stream] = []
        self.predicting: dict[Any, tuple[int, Any, ReadTask]] = {}  # header -> actor, rows, task
        self.commits: dict[Any, str] = {}  # receipts ref -> which pieces
        self.pieces = PieceAssembler()
        # Units seen per read task, until the task has ended and its units are all back.
        self.seen: dict[int, set[int]] = {}
        self.ended: set[int] = set()
        self.done_tasks, self.rows = 0, 0
        self.warned_fallbacks = False
        started = last_log = self.moved = time.monotonic()
        tick = min(PROGRESS_S, self.stall_timeout / 4)
        try:
            while self.queue or self.streams or self.predicting or self.commits:
                while self.queue and len(self.streams) < self.placement.max_reads:
                    task = self.queue.pop()
                    self.streams.append(_Stream(task, self.read.remote(task,
                                                                       self.reader_kwargs)))
                room = (any(self.load[a] < self.slots for a in self.started)
                        and len(self.commits) < self.placement.max_commits)
                waiting = [*self.starting, *self.predicting, *self.commits,
                           *(s.generator for s in self.streams if room)]
                # fetch_local=False: readiness only; never pull a unit to the driver's node.
                ready, _ = ray.wait(waiting, num_returns=1, timeout=tick, fetch_local=False)
                for ref in ready:
                    if ref in self.starting:
                        self._actor_started(ref)
                    elif ref in self.commits:
                        self._receipt(ref)
                    elif ref in self.predicting:
                        self._predicted(ref)
                    else:
                        self._next_unit(next(s for s in self.streams if s.generator == ref))
                if time.monotonic() - self.moved > self.stall_timeout:
                    raise StageStalled(self._stalled(len(tasks)))
                if time.monotonic() - last_log >= PROGRESS_S:
                    last_log = time.monotonic()
                    log.info("... %d/%d read tasks done, %d rows committed (%.1f rows/s), %d "
                             "unit(s) predicting, %d commit(s) running, %d piece(s) open%s",
                             self.done_tasks, len(tasks), self.rows,
                             self.rows / (last_log - started), len(self.predicting),
                             len(self.commits), len(self.pieces.open),
                             f"; {decode_text(self.stats.device_decoded, self.stats.cpu_fallbacks)}"
                             if self.stats.decoded_any() else "")
            if self.pieces.open:
                raise RuntimeError(f"{len(self.pieces.open)} piece(s) never received all their "
                                   f"rows (e.g. {next(iter(self.pieces.open))}): their files "
                                   "were not written; rerun the job to redo them")
            return self.stats
        finally:
            for stream in self.streams:  # a failed run stops reading (a finished one has none)
                with contextlib.suppress(Exception):
                    ray.cancel(stream.generator, force=True)
            for actor in self.actors:  # give the GPUs back now, not when the job ends
                ray.kill(actor)

    def _stalled(self, total_tasks: int) -> str:
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
        lines = [f"read tasks: {self.done_tasks}/{total_tasks} done, {len(self.streams)} "
                 f"running ({'; '.join(_task_text(s.task) for s in self.streams[:3]) or '-'}), "
                 f"{len(self.queue)} waiting",
                 f"predictor actors: {len(self.actors)} ({len(self.started)} started), units in "
                 f"flight per actor {self.load}{self._actor_states()}",
                 f"commits running: {len(self.commits)} "
                 f"({'; '.join(list(self.commits.values())[:3]) or '-'})",
                 f"pieces open: {len(self.pieces.open)}, rows committed: {self.rows}"]
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
        """Take a read task's next unit and send it to the least loaded predictor."""
        try:
            unit = _result(stream.generator, _task_text(stream.task), next)
        except StopIteration:
            self.streams.remove(stream)
            self.done_tasks += 1
            self.ended.add(stream.task.index)
            self._forget(stream.task.index)
            return
        actor = min(self.started, key=self.load.__getitem__)
        header_ref, rows_ref = self.actors[actor].predict.options(num_returns=2).remote(unit)
        self.load[actor] += 1
        self.predicting[header_ref] = (actor, rows_ref, stream.task)

    def _actor_started(self, ref) -> None:
        """A predictor actor holds its model (or failed to load it: the run stops)."""
        actor = self.starting.pop(ref)
        _result(ref, "a predictor actor")
        self.started.append(actor)

    def _predicted(self, header_ref) -> None:
        """A unit is predicted: add it to its pieces and commit every piece now complete."""
        actor, rows_ref, task = self.predicting.pop(header_ref)
        self.load[actor] -= 1
        self.moved = time.monotonic()
        header = _result(header_ref, "a predictor actor")
        seen = self.seen.setdefault(header.task, set())
        if header.index in seen:
            return  # a unit delivered twice is committed once
        seen.add(header.index)
        self._forget(header.task)
        self.stats.add(header.out_rows, header.device_decode)
        self._warn_on_fallbacks()
        ready = self.pieces.add(header, rows_ref)
        if ready:  # one commit task for every piece this unit completed
            units: dict[int, tuple[int, Any]] = {}  # id(ref) -> (argument index, ref)
            specs, parts = [], []
            for piece in ready:
                specs.append(self.piece_spec(task, piece.shard, piece.piece, piece.last))
                parts.append([(units.setdefault(id(unit), (len(units), unit))[0], start, stop)
                              for unit, (start, stop) in piece.parts])
            receipts = self.commit.remote(specs, parts, *(ref for _, ref in units.values()))
            self.commits[receipts] = (specs[0].stem if len(specs) == 1
                                      else f"{specs[0].stem} and {len(specs) - 1} more")

    def _warn_on_fallbacks(self) -> None:
        """Once per run: say so when many images skip the device decoder (a torchvision
        without nvJPEG, an archive of PNGs, a GPU short of memory)."""
        stats = self.stats
        decoded = stats.device_decoded + sum(stats.cpu_fallbacks.values())
        if not self.warned_fallbacks and decoded >= FALLBACK_WARN_AFTER:
            warning = stats.fallback_warning()
            if warning:
                self.warned_fallbacks = True
                log.warning("%s", warning)

    def _forget(self, task: int) -> None:
        """Drop a finished read task's bookkeeping: the driver keeps nothing per unit."""
        if task in self.ended and not any(t.index == task for _, _, t in
                                          self.predicting.values()):
            self.seen.pop(task, None)
            self.ended.discard(task)

    def _receipt(self, ref) -> None:
        stems = self.commits.pop(ref)
        self.moved = time.monotonic()
        for receipt in _result(ref, f"the commit of piece(s) {stems}"):
            self.rows += receipt["rows"]
            self.on_receipt(receipt)
