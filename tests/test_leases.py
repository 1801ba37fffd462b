"""Leases and nodes without Ray: where predictors go, how shards become leases, and the book the
driver keeps (requeue on loss, speculation, one receipt per file)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pipeline.io.shards import Shard
from pipeline.stages.leases import (
    MAX_LEASE_LOSSES,
    SPECULATE_MIN_S,
    LeaseBook,
    LeaseLostTooOften,
    Node,
    WorkLease,
    node_slots,
    plan_leases,
    predictor_capacity,
    split_free_cpus,
    spread_predictors,
)
from pipeline.stages.units import ShardTask


def _todo(sizes) -> list[ShardTask]:
    return [ShardTask(Shard(f"s{i:03d}", f"/in/s{i:03d}.tar", "tar", size=size))
            for i, size in enumerate(sizes)]


GPU_NODES = [Node(f"n{i}", cpus=4, gpus=2) for i in range(4)]


def test_predictors_fill_every_gpu_node_evenly():
    assert spread_predictors(GPU_NODES, 8, 1, 1) == {f"n{i}": 2 for i in range(4)}
    three = spread_predictors(GPU_NODES, 3, 1, 1, rng=random.Random(0))
    assert sorted(three.values()) == [1, 1, 1]  # never two on one node while one has none
    # More than the GPUs hold: as many as fit, none pending for ever.
    assert sum(spread_predictors(GPU_NODES, 20, 1, 1).values()) == 8


def test_ties_go_to_no_node_in_particular():
    winners = Counter(next(iter(spread_predictors(GPU_NODES, 1, 1, 1, rng=random.Random(s))))
                      for s in range(200))
    assert set(winners) == {"n0", "n1", "n2", "n3"}
    assert min(winners.values()) > 20


def test_kept_predictors_stay_and_draining_or_full_nodes_get_none():
    nodes = [*GPU_NODES[:3], Node("n3", 4, 2, draining=True), Node("head", 2, 0)]
    share = spread_predictors(nodes, 8, 1, 1, have={"n0": 2})
    assert share == {"n0": 2, "n1": 2, "n2": 2}  # 6: the draining node and the head hold none
    # CPU actors: limited by the CPUs each node keeps free for reads and commits.
    assert predictor_capacity(Node("c", 2, 0), 1, 0) == 1
    assert predictor_capacity(Node("c", 1, 0), 0.5, 0) == 1
    assert predictor_capacity(Node("c", 0.4, 0), 0.5, 0) == 0


def test_node_slots_leave_the_cpus_beside_the_predictors_to_reads_and_commits():
    slots = node_slots(Node("n", 4, 2), 2, 1)
    assert slots.predictors == 2
    used = 2 * 1 + slots.max_reads * slots.read_cpus + slots.max_commits * slots.commit_cpus
    assert used <= 4 + 1e-9 and slots.max_reads >= 1 and slots.max_commits >= 1
    assert split_free_cpus(1.0, 1) == (1, 0.5, 2, 0.25)  # this machine's local plan


def test_leases_cut_the_listing_in_order_within_their_bounds():
    todo = _todo([10] * 100)
    leases = plan_leases(todo, agents=4, min_bytes=1, max_bytes=10_000)
    assert len(leases) == 16  # 4 per agent
    assert [t for lease in leases for t in lease.shards] == todo  # each shard once, in order
    assert [lease.id for lease in leases] == list(range(16))
    # A small input is one lease per agent (every node works from the start, units stay as
    # full as that allows); a big one is capped per lease.
    small = plan_leases(todo, agents=4, min_bytes=10_000)
    assert [len(lease.shards) for lease in small] == [25] * 4
    assert len(plan_leases(todo, agents=1, min_bytes=10_000)) == 1
    assert len(plan_leases(todo[:3], agents=4, min_bytes=10_000)) == 3  # a shard at most each
    assert all(lease.bytes <= 50 for lease in plan_leases(todo, 1, min_bytes=1, max_bytes=50))
    assert max(len(lease.shards) for lease in plan_leases(todo, 1, max_shards=7)) == 7
    assert plan_leases([], agents=3) == []


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _book(n: int, clock: Clock | None = None) -> LeaseBook:
    leases = [WorkLease(i, tuple(_todo([1]))) for i in range(n)]
    return LeaseBook(leases, clock=clock or Clock())


def _receipt(name: str) -> dict:
    return {"file": name, "rows": 1}


def test_a_lease_lost_with_its_agent_is_next_in_line_and_counts_once():
    book = _book(3)
    first = book.take("a")
    book.started("k1", first, "a")
    book.started("k2", book.take("a"), "a")
    assert book.receipts(0, [_receipt("x"), _receipt("y")]) == [_receipt("x"), _receipt("y")]
    book.lose("k1")
    assert book.take("b") is first  # back at the front of the queue
    book.started("k3", first, "b")
    # The redo reports x again: only z is new.
    assert book.receipts(0, [_receipt("x"), _receipt("z")]) == [_receipt("z")]
    assert book.finish("k3") == (True, [])
    # A poll can arrive after the lease's result: new files count, repeated ones do not.
    assert book.receipts(0, [_receipt("x"), _receipt("late")]) == [_receipt("late")]
    assert book.lost == 1 and not book.finished
    # A lease that ran once keeps no file names once finished; its late receipts all count.
    assert book.finish("k2") == (True, []) and 1 not in book.files
    assert book.receipts(1, [_receipt("p")]) == [_receipt("p")]


def test_a_lease_lost_too_often_stops_the_run():
    book = _book(1)
    for i in range(MAX_LEASE_LOSSES - 1):
        book.started(i, book.take("a"), "a")
        book.lose(i)
    book.started("last", book.take("a"), "a")
    with pytest.raises(LeaseLostTooOften, match="lost with its node agent"):
        book.lose("last")


def test_speculation_starts_a_slow_lease_elsewhere_and_the_first_to_finish_wins():
    clock = Clock()
    book = _book(3, clock)
    for key, agent in (("a0", "a"), ("b0", "b"), ("c0", "slow")):
        book.started(key, book.take(agent), agent)
    assert book.to_speculate("a") is None  # nothing finished yet: no median to compare
    clock.now = 1.0
    book.finish("a0")
    book.finish("b0")
    clock.now = 1.0 + SPECULATE_MIN_S / 2
    assert book.to_speculate("a") is None  # not slow yet
    clock.now = 10.0
    assert book.to_speculate("slow") is None  # never a copy on the agent that runs it
    copy = book.to_speculate("a")
    assert copy is not None and copy.id == 2
    book.started("a1", copy, "a", speculative=True)
    assert book.to_speculate("b") is None  # one copy per lease
    # The copy wins: the slow attempt is to be abandoned; its receipts are dropped.
    assert book.receipts(2, [_receipt("f")]) == [_receipt("f")]
    assert book.finish("a1") == (True, ["c0"])
    book.abandon("c0")
    assert book.receipts(2, [_receipt("f")]) == []  # the loser's, polled late: dropped
    assert book.finished and (book.speculated, book.won_by_speculation) == (1, 1)
    # Losing the slow attempt while its copy runs does not requeue the lease.
    book2 = _book(1, clock)
    lease = book2.take("slow")
    book2.started("s", lease, "slow")
    book2.started("c", lease, "a", speculative=True)
    book2.lose("s")
    assert book2.take("b") is None and list(book2.attempts) == ["c"]


def test_a_read_task_stays_at_most_one_unit_ahead(ray_session, tmp_path):
    """The read tasks' bound on units made and not yet taken (a private Ray option: no public
    one in Ray 2.60): a generator of 10 items with the executor's options, whose consumer takes
    one and then waits, has made at most 2 (the taken one and the one ready)."""
    import time

    from pipeline.backend.executor import GENERATOR_BOUND

    def produce(folder: str):
        from pathlib import Path

        for i in range(10):
            Path(folder, str(i)).touch()
            yield i

    stream = ray_session.remote(produce).options(**GENERATOR_BOUND).remote(str(tmp_path))
    assert ray_session.get(next(stream)) == 0
    time.sleep(2)  # time for the producer to run ahead, if the bound let it
    made = len(list(tmp_path.iterdir()))
    assert 1 <= made <= 2, made
    assert [ray_session.get(ref) for ref in stream] == list(range(1, 10))
    assert len(list(tmp_path.iterdir())) == 10


def test_leases_running_at_once_come_from_across_the_listing():
    leases = [WorkLease(i, ()) for i in range(16)]
    book = LeaseBook(leases, spread=8)
    first = [book.take("a").id for _ in range(8)]
    assert first == [0, 2, 4, 6, 8, 10, 12, 14]
    assert sorted(first + [book.take("a").id for _ in range(8)]) == list(range(16))
    assert [LeaseBook(leases).take("a").id for _ in range(1)] == [0]
