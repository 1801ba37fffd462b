"""Run the inference job's units on Ray Core; the only module of the inference path that imports
Ray.

    read task (CPU, streaming generator) --unit--> predictor actor (GPU) --rows--> commit task
          per read task: a few shards                per call: one unit         per piece:
          yields one unit at a time                  returns (header, rows)     Parquet + record

The driver moves object references, never rows: it pulls a unit reference from a read task when
a predictor has room for it, sends it to the least loaded actor, receives the unit's header back
(which pieces its rows belong to), and when every row of a piece has been predicted submits the
piece's commit with the references of the units that hold it. Per unit that is a handful of Ray
calls (about a millisecond of driver CPU), so units of thousands of rows keep the driver far below
a core however many GPUs there are; it keeps only counters and the pieces still open.

Why not Ray Data: its blocks are merged and split by size, so a unit would not stay together from
read to commit without a regrouping step (the driver-side collector this replaced), and its
executor costs 13-17 ms of driver CPU per task (measured here), ten times a unit's cost here.

Exactly once: a read task that dies is retried by Ray, which replays its generator and drops the
units it had already delivered (and the driver also ignores a unit it has seen); a predictor that
dies is restarted and the call retried; a commit that dies is retried and rewrites the same
bytes under the same name. Output names come from the input, so no retry can add a file.

Bounded memory: at most ``concurrency + 1`` units per actor are in flight, each read task holds
at most one unit it has not handed over (generator backpressure), and commits in flight are
capped; the read task count is planned so that commits always find a CPU.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.commit import PieceSpec, commit_piece, gather
from pipeline.units import PieceAssembler, ReadTask

log = logging.getLogger("pipeline")

READ_TASK_RETRIES = 3
ACTOR_RESTARTS = 3
COMMIT_RETRIES = 3
PROGRESS_S = 30.0


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at ``address`` / ``RAY_ADDRESS`` or start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    log.info("connecting to Ray at %s", address) if address else log.info("starting local Ray")
    ray.init(address=address)


def cluster_resources() -> tuple[float, int]:
    """(CPUs, GPUs) of the cluster."""
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0)), int(resources.get("GPU", 0))


@dataclass(frozen=True)
class Placement:
    """How many of each worker, with which resources (``pipeline.inference.plan``)."""

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
    units: int = 0
    rows_per_call: list[int] = field(default_factory=list)

    def call_sizes(self) -> dict[str, float]:
        sizes = [n for n in self.rows_per_call if n]
        if not sizes:
            return {}
        return {"min": min(sizes), "mean": round(sum(sizes) / len(sizes), 1),
                "max": max(sizes)}


def _read_units(task: ReadTask, reader_kwargs: Mapping[str, Any]):
    from pipeline.stages import ShardReader

    for header, rows in ShardReader(**reader_kwargs).read_task(task):
        yield {"header": header, "rows": rows}


class _Predictor:
    """The actor around a predictor class: one model per actor, ``(header, rows)`` per unit."""

    def __init__(self, predictor_cls: type, kwargs: Mapping[str, Any]):
        self.predictor = predictor_cls(**kwargs)

    def predict(self, unit: Mapping[str, Any]):
        return unit["header"], self.predictor(unit["rows"])


def _commit(spec: PieceSpec, ranges: list[tuple[int, int]], *units) -> dict[str, Any]:
    return commit_piece(spec, gather(units, ranges))


class StageFailed(RuntimeError):
    """A stage failed for good (after Ray's retries); what was committed stays committed."""


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
        self.task, self.generator, self.started = task, generator, time.monotonic()


class UnitRunner:
    """Drives one job's read tasks, predictor actors and commits until every piece is in."""

    def __init__(self, placement: Placement, reader_kwargs: Mapping[str, Any],
                 predictor_cls: type, predictor_kwargs: Mapping[str, Any],
                 piece_spec: Callable[[ReadTask, int, int, bool], PieceSpec],
                 on_receipt: Callable[[dict[str, Any]], None]):
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
        self.load = [0] * len(self.actors)
        self.slots = placement.concurrency + 1  # one queued call: the actor never waits on us
        self.stats = RunStats()

    def run(self, tasks: list[ReadTask]) -> RunStats:
        ray = self.ray
        queue = list(reversed(tasks))
        streams: list[_Stream] = []
        predicting: dict[Any, tuple[int, Any, ReadTask]] = {}  # header ref -> actor, rows, task
        commits: dict[Any, str] = {}  # receipt ref -> stem
        pieces = PieceAssembler()
        seen: set[tuple[int, int]] = set()
        done_tasks, last_log, started = 0, time.monotonic(), time.monotonic()
        rows = 0
        try:
            while queue or streams or predicting or commits:
                while queue and len(streams) < self.placement.max_reads:
                    task = queue.pop()
                    streams.append(_Stream(task, self.read.remote(task, self.reader_kwargs)))
                room = (min(self.load) < self.slots
                        and len(commits) < self.placement.max_commits)
                waiting = [*predicting, *commits, *(s.generator for s in streams if room)]
                ready, _ = ray.wait(waiting, num_returns=1, timeout=PROGRESS_S)
                for ref in ready:
                    if ref in commits:
                        stem = commits.pop(ref)
                        receipt = _result(ref, f"the commit of piece {stem}")
                        rows += receipt["rows"]
                        self.on_receipt(receipt)
                    elif ref in predicting:
                        actor, rows_ref, task = predicting.pop(ref)
                        self.load[actor] -= 1
                        header = _result(ref, "a predictor actor")
                        if (header.task, header.index) in seen:
                            continue  # a unit delivered twice is committed once
                        seen.add((header.task, header.index))
                        self.stats.units += 1
                        self.stats.rows_per_call.append(header.rows)
                        for piece in pieces.add(header, rows_ref):
                            spec = self.piece_spec(task, piece.shard, piece.piece, piece.last)
                            receipt = self.commit.remote(spec, [r for _, r in piece.parts],
                                                         *[u for u, _ in piece.parts])
                            commits[receipt] = spec.stem
                    else:
                        stream = next(s for s in streams if s.generator == ref)
                        try:
                            unit = _result(stream.generator, _task_text(stream.task), next)
                        except StopIteration:
                            streams.remove(stream)
                            done_tasks += 1
                            continue
                        actor = min(range(len(self.actors)), key=self.load.__getitem__)
                        header_ref, rows_ref = self.actors[actor].predict.options(
                            num_returns=2).remote(unit)
                        self.load[actor] += 1
                        predicting[header_ref] = (actor, rows_ref, stream.task)
                if time.monotonic() - last_log >= PROGRESS_S:
                    last_log = time.monotonic()
                    log.info("... %d/%d read tasks done, %d rows committed (%.1f rows/s), %d "
                             "unit(s) predicting, %d commit(s) running, %d piece(s) open",
                             done_tasks, len(tasks), rows, rows / (last_log - started),
                             len(predicting), len(commits), len(pieces.open))
            if pieces.open:
                raise RuntimeError(f"{len(pieces.open)} piece(s) never received all their rows "
                                   f"(e.g. {next(iter(pieces.open))}): their files were not "
                                   "written; rerun the job to redo them")
            return self.stats
        finally:
            for actor in self.actors:  # give the GPUs back now, not when the job ends
                ray.kill(actor)
