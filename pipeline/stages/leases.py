"""Leases and nodes: how the driver spreads the work and the workers over a cluster, without Ray.

The inference job runs one **node agent** per node that hosts predictors
(``pipeline.backend.executor``): it reads, predicts and commits on its own node, so a unit never
crosses the network. The driver only decides, from this module:

- **where the predictors go** (``spread_predictors``): round the nodes, each taking one more
  predictor while its GPUs (or CPUs) allow, so a cluster is filled evenly and ties go to no
  node in particular;
- **what each node's agent runs at once** (``node_slots``): its predictors, read tasks and
  commits, from that node's CPUs (``split_free_cpus``, the same split the whole-cluster plan
  uses);
- **which shards each agent gets** (``plan_leases``, ``LeaseBook``): the shards still to do,
  in listing order, cut into leases of many shards; an agent holds at most
  ``IN_FLIGHT_PER_AGENT`` leases (one running, one queued so it never waits for the driver).
  A lease lost with its agent (a node preempted or drained, the agent process killed) goes back
  to the front of the queue; near the end, a lease still running while an agent sits idle is
  started there too (speculation) and the first attempt to finish wins. Output names are
  deterministic and commits idempotent, so a second attempt rewrites the same bytes, and the
  book keeps one receipt per file.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.config.errors import JobFailed
from pipeline.stages.units import ShardTask

COMMIT_CPUS = 0.25  # a commit is Parquet encoding and two PUTs: mostly waiting
MIN_FREE_CPUS = 0.5  # what the actors always leave to read and commit tasks
# Leases: ~LEASES_PER_AGENT per agent, so the last quarter of the work balances the nodes,
# but never smaller than MIN_LEASE_BYTES (a small input is one lease: its units stay full)
# or larger than MAX_LEASE_BYTES (a lease lost with its node is redone: bounded waste).
LEASES_PER_AGENT = 4
MIN_LEASE_BYTES = 16 << 20
MAX_LEASE_BYTES = 8 << 30
MAX_LEASE_SHARDS = 20_000
IN_FLIGHT_PER_AGENT = 2
# A lease lost with its agent this many times (preemptions, not application errors) stops the
# run: something kills every agent that takes it.
MAX_LEASE_LOSSES = 8
# Speculation: a lease running longer than this many times the median finished lease (and at
# least SPECULATE_MIN_S) is also started on an idle agent once the queue is empty.
SPECULATE = True  # off only to measure the tail without it (jobs/benchmark_scale.py)
SPECULATE_FACTOR = 1.5
SPECULATE_MIN_S = 2.0


def split_free_cpus(free: float, predictors: int) -> tuple[int, float, int, float]:
    """``(max_reads, read_cpus, max_commits, commit_cpus)`` for ``free`` CPUs beside
    ``predictors`` actors: half of them at most to commits (capped at two a predictor plus
    two), the rest to read tasks (at least one, with a fraction of a CPU if that is all)."""
    free = max(free, 0.0)
    max_commits = max(1, min(2 * predictors + 2, int(free / 2 / COMMIT_CPUS)))
    commit_cpus = min(COMMIT_CPUS, free / 2 / max_commits)
    rest = free - max_commits * commit_cpus
    max_reads = max(1, int(rest))
    return max_reads, min(1.0, rest / max_reads), max_commits, commit_cpus


@dataclass(frozen=True)
class Node:
    """A node of the cluster as the driver sees it (``ray.nodes()``)."""

    id: str
    cpus: float
    gpus: float
    draining: bool = False


@dataclass(frozen=True)
class Placement:
    """How the predictors run (``pipeline.inference.job.plan``): ``count`` actors with these
    resources each; ``elastic``: one per ``actor_gpus`` of every GPU in the cluster, growing
    and shrinking as nodes come and go (``count`` is how many the cluster holds now). The read
    and commit slots are worked out per node (``node_slots``)."""

    count: int
    actor_cpus: float
    actor_gpus: float
    concurrency: int
    elastic: bool = False


@dataclass(frozen=True)
class NodeSlots:
    """What one node's agent runs at once."""

    predictors: int
    max_reads: int
    read_cpus: float
    max_commits: int
    commit_cpus: float


def predictor_capacity(node: Node, actor_cpus: float, actor_gpus: float) -> int:
    """Predictor actors ``node`` can hold, leaving ``MIN_FREE_CPUS`` for reads and commits."""
    by_cpu = int((node.cpus - MIN_FREE_CPUS) / actor_cpus + 1e-9) if actor_cpus > 0 else 1 << 30
    by_gpu = int(node.gpus / actor_gpus + 1e-9) if actor_gpus > 0 else 1 << 30
    return max(0, min(by_cpu, by_gpu))


def node_slots(node: Node, predictors: int, actor_cpus: float) -> NodeSlots:
    return NodeSlots(predictors, *split_free_cpus(node.cpus - predictors * actor_cpus,
                                                  predictors))


def spread_predictors(nodes: Sequence[Node], want: int, actor_cpus: float, actor_gpus: float,
                      have: Mapping[str, int] | None = None,
                      rng: random.Random | None = None) -> dict[str, int]:
    """How many predictors each node should host so that ``want`` run in all (or as many as the
    nodes hold): ``have`` (node -> already hosted) is kept, the rest go one at a time to the
    node with the fewest, ties broken at random. Draining nodes get none."""
    rng = rng or random.Random()
    out = {n.id: (have or {}).get(n.id, 0) for n in nodes}
    room = {n.id: predictor_capacity(n, actor_cpus, actor_gpus) - out[n.id]
            for n in nodes if not n.draining}
    order = list(room)
    rng.shuffle(order)
    for _ in range(max(0, want - sum(out.values()))):
        open_nodes = [n for n in order if room[n] > 0]
        if not open_nodes:
            break
        best = min(open_nodes, key=lambda n: out[n])
        out[best] += 1
        room[best] -= 1
    return {n: k for n, k in out.items() if k}


@dataclass(frozen=True)
class WorkLease:
    """Consecutive shards one agent reads, predicts and commits."""

    id: int
    shards: tuple[ShardTask, ...]

    @property
    def bytes(self) -> int:
        return sum(t.shard.size for t in self.shards)


def plan_leases(todo: Iterable[ShardTask], agents: int, min_bytes: int | None = None,
                max_bytes: int | None = None, max_shards: int | None = None
                ) -> list[WorkLease]:
    """Cut the shards to do, in listing order, into leases of about ``total / (agents *
    LEASES_PER_AGENT)`` listed bytes, within ``[min_bytes, max_bytes]`` and ``max_shards``
    (by default ``MIN_LEASE_BYTES``, ``MAX_LEASE_BYTES``, ``MAX_LEASE_SHARDS``). Never fewer
    leases than agents while there are shards enough: an input small for its cluster (a
    nightly partition of a few GB on hundreds of nodes) still puts every node to work."""
    min_bytes = MIN_LEASE_BYTES if min_bytes is None else min_bytes
    max_bytes = MAX_LEASE_BYTES if max_bytes is None else max_bytes
    max_shards = MAX_LEASE_SHARDS if max_shards is None else max_shards
    todo = list(todo)
    total = sum(t.shard.size for t in todo)
    target = min(max_bytes, max(min_bytes, math.ceil(total / max(1, agents * LEASES_PER_AGENT))))
    count = max(1, math.ceil(total / max(1, target)), min(len(todo), agents))
    leases, current, before = [], [], 0
    for item in todo:
        # Lease k holds the shards whose middle byte falls in the k-th of ``count`` equal
        # parts of the listing: equal leases, whatever the shard sizes' rounding.
        part = min(count - 1, int((before + item.shard.size / 2) * count / max(1, total)))
        if current and (part > len(leases) or len(current) >= max_shards):
            leases.append(WorkLease(len(leases), tuple(current)))
            current = []
        current.append(item)
        before += item.shard.size
    if current:
        leases.append(WorkLease(len(leases), tuple(current)))
    return leases


class LeaseLostTooOften(JobFailed):
    """A lease was lost with its agent ``MAX_LEASE_LOSSES`` times."""


@dataclass
class _Attempt:
    lease: int
    agent: Hashable
    started: float
    speculative: bool = False


@dataclass
class LeaseBook:
    """The driver's record of the leases: which wait, which run where, which are done.

    Attempts are named by opaque keys (on Ray: the reference of the agent call). Memory grows
    with leases (a few integers each), never with units or rows; the set of files already
    received is kept only while a lease is open."""

    leases: list[WorkLease]
    clock: Callable[[], float] = time.monotonic
    max_losses: int = MAX_LEASE_LOSSES
    spread: int = 1  # leases running at once: handed out evenly spaced over the listing
    queue: deque = field(init=False)
    attempts: dict = field(default_factory=dict)  # key -> _Attempt
    files: dict = field(default_factory=dict)  # open lease -> files received
    losses: dict = field(default_factory=dict)  # lease -> times lost with its agent
    durations: list = field(default_factory=list)  # seconds of each finished lease
    done: set = field(default_factory=set)
    retried: set = field(default_factory=set)  # leases that ran more than once
    speculated: int = 0
    won_by_speculation: int = 0
    lost: int = 0

    def __post_init__(self):
        self.by_id = {lease.id: lease for lease in self.leases}
        # Leases that run at once come from across the listing, not one after the other: their
        # GETs, and the PUTs of outputs named after them, spread over the key range, which
        # object stores partition by (docs/scale-out.md, "Object storage").
        stride = max(1, len(self.leases) // max(1, self.spread))
        ids = sorted((lease.id for lease in self.leases), key=lambda i: (i % stride, i))
        self.queue = deque(ids)

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.leases)

    def take(self, agent: Hashable) -> WorkLease | None:
        """The next lease in the queue for ``agent`` (start it with ``started``)."""
        while self.queue:
            lease = self.queue.popleft()
            if lease not in self.done:
                return self.by_id[lease]
        return None

    def started(self, key: Hashable, lease: WorkLease, agent: Hashable,
                speculative: bool = False) -> None:
        if lease.id in self.files:
            self.retried.add(lease.id)  # a second attempt: its files are kept to the end
        self.attempts[key] = _Attempt(lease.id, agent, self.clock(), speculative)
        self.files.setdefault(lease.id, set())
        if speculative:
            self.speculated += 1

    def lease_of(self, key: Hashable) -> int:
        return self.attempts[key].lease

    def receipts(self, lease: int, receipts: Iterable[Mapping]) -> list[Mapping]:
        """The receipts not seen before for ``lease``: a redone or speculated lease reports a
        file again. Receipts polled from an agent may arrive after its lease's result; a lease
        that ever ran more than once keeps its set of files for that, the others (nearly
        all) need none: one attempt reports each file once."""
        if lease in self.done and lease not in self.files:
            return list(receipts)
        seen = self.files.setdefault(lease, set())
        new = []
        for receipt in receipts:
            if receipt["file"] not in seen:
                seen.add(receipt["file"])
                new.append(receipt)
        return new

    def finish(self, key: Hashable) -> tuple[bool, list]:
        """The attempt ``key`` finished its lease: ``(first, other attempts to abandon)``."""
        attempt = self.attempts.pop(key)
        if attempt.lease in self.done:
            return False, []
        self.done.add(attempt.lease)
        if attempt.lease not in self.retried:
            self.files.pop(attempt.lease, None)
        self.durations.append(self.clock() - attempt.started)
        if attempt.speculative:
            self.won_by_speculation += 1
        others = [k for k, a in self.attempts.items() if a.lease == attempt.lease]
        return True, others

    def abandon(self, key: Hashable) -> None:
        self.attempts.pop(key, None)

    def lose(self, key: Hashable) -> None:
        """The attempt ``key`` was lost with its agent: the lease waits at the front of the
        queue again, unless another attempt of it still runs."""
        attempt = self.attempts.pop(key, None)
        if attempt is None or attempt.lease in self.done:
            return
        self.lost += 1
        self.losses[attempt.lease] = self.losses.get(attempt.lease, 0) + 1
        if self.losses[attempt.lease] >= self.max_losses:
            names = [t.shard.name for t in self.by_id[attempt.lease].shards[:3]]
            raise LeaseLostTooOften(
                f"the lease of shard(s) {', '.join(names)}... was lost with its node agent "
                f"{self.losses[attempt.lease]} times (nodes preempted or agents killed); the "
                "files committed so far stay, and a rerun does the rest")
        if not any(a.lease == attempt.lease for a in self.attempts.values()):
            self.queue.appendleft(attempt.lease)

    def to_speculate(self, agent: Hashable) -> WorkLease | None:
        """Once the queue is empty: the longest-running lease with a single attempt, not on
        ``agent``, running for longer than ``SPECULATE_FACTOR`` times the median finished
        lease (at least ``SPECULATE_MIN_S``); None when there is none."""
        if not SPECULATE or self.queue or not self.durations:
            return None
        threshold = max(SPECULATE_MIN_S, SPECULATE_FACTOR * statistics.median(self.durations))
        now = self.clock()
        counts: dict[int, int] = {}
        for a in self.attempts.values():
            counts[a.lease] = counts.get(a.lease, 0) + 1
        candidates = [a for a in self.attempts.values()
                      if counts[a.lease] == 1 and a.agent != agent
                      and now - a.started > threshold]
        if not candidates:
            return None
        return self.by_id[min(candidates, key=lambda a: a.started).lease]
