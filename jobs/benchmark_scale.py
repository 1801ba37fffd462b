"""Scale-out: the real inference pipeline with a stand-in predictor on a multi-node Ray cluster.

    python jobs/benchmark_scale.py            # 1, 2, 4, 8 simulated GPUs + 100,000-shard listing
    python jobs/benchmark_scale.py --quick    # a small version (a few minutes on 2 cores)
    python jobs/benchmark_scale.py --quick --saturate-rows 120000 --straggler --chaos 1,2,3

Part 1, scaling. A ``ray.cluster_utils.Cluster`` in this process: a head node (the driver's)
and worker nodes with fake ``GPU`` resources. For each simulated GPU count the job's own code
(``run_inference``: listing, resume check, read tasks, predictor actors, commit, receipts,
manifest) runs over tar shards of tiny JPEGs with a face box sidecar and ``--decode gpu`` (the
read tasks probe headers only, as on a GPU cluster), with one change: the predictor is
``StandInPredictor``, which holds each batch for ``rows / rate`` seconds per simulated GPU (a
lock per actor, so concurrent calls do not add up to more than one GPU) and returns
deterministic landmarks. No VGG16 runs, so the figures are the pipeline's own. Per GPU count:

- ``rows_per_s``: rows committed per second in steady state (the slope of rows committed
  against time, from 10 % to 90 % of the rows), and ``rows_per_s_overall`` over the whole call,
  start-up included;
- ``driver_cpu_s_per_million_rows``: the driver process's own CPU time (user + system,
  ``getrusage(RUSAGE_SELF)``, sampled every 0.1 s) over the steady window, per million rows;
  ``driver_cpu_s_total`` is the whole call's, which also pays for loading the model once.
  At the low row rates this machine allows, much of it is the connected Ray client's idle cost
  (``driver_idle_cpu_s_per_s``, measured for 5 s before the run, with the sampler running: it
  costs ~1-3 ms/s itself), which does not grow with rows;
  ``driver_cpu_s_per_million_rows_above_idle`` takes it out, and
  ``driver_main_thread_cpu_s_per_million_rows`` is the job's own driver code (the dispatch loop);
- ``commit_worker_cpu_us_per_row``: CPU of the workers' commit path per row (from the
  receipts; 0 where the driver commits), and ``..._warm`` without each worker process's first
  commit, which pays pyarrow's one-time imports (pandas among them: ~0.3-0.5 s per process);
- ``driver_peak_mb``: the driver's peak resident memory during the call (sampled ``VmRSS``);
- ``units``, ``leases``, ``node_agents``; ``cross_node_unit_bytes_fraction`` (bytes of units
  whose read task ran on another node than their predictor) and
  ``cross_node_row_bytes_fraction`` (bytes of predicted rows committed on another node than
  their predictor's), from the node ids each stage records.

Then, unless ``--saturate-rows 0``, runs on 2 simulated GPUs whose stand-in is never the limit,
one per ``--saturate-unit-rows`` (256 and 4,096): rows flow as fast as this machine's cores read
and commit them, which is where a driver that handles rows or units would show its cost.

``--straggler``: the same input twice on all the simulated GPUs with one node's stand-in at a
tenth of the rate, with speculation and without: ``tail_s_*`` is the time from 90 % of the rows
committed to the last commit (``straggler`` in scale.json).

``--chaos SEEDS``: >= ``--chaos-units`` units (16 rows each) once undisturbed, then once per
seed while ``ChaosMonkey`` kills, at random moments after the first commit, read tasks,
predictor actors, commit tasks, node agents (SIGKILL, found by process title) and a whole
worker node (``cluster.remove_node``, then a fresh node joins). Each run's output must equal the
undisturbed one (file list and a hash of every row); ``chaos.json`` has per seed the kills by
kind, ``identical``, ``duplicates`` and ``missing``.

Part 2, many shards: 100,000 one-byte ``.tar`` files (``--listing-shards``) listed, checked for
resume and planned into read tasks (``plan_read_tasks``) without running them: seconds and the
driver's peak memory, with the 1,000,000 figures extrapolated linearly (stated as such). What
running them costs the driver per unit is part 1's driver CPU figure.

Writes ``--out``/scale.json: ``{"scaling": [{"gpus", "rows_per_s", "driver_cpu_s_per_million_rows",
"driver_peak_mb", ...}], "straggler": {...}, "chaos": {...}, "listing": {...}, "settings": {...}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Run from anywhere, installed or not (as under `ray job submit --working-dir .`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.inference.config import InferConfig  # noqa: E402
from pipeline.inference.job import run_inference  # noqa: E402
from pipeline.io.resume import DONE_DIR  # noqa: E402
from pipeline.io.rows import TRAVEL_ONLY  # noqa: E402

log = logging.getLogger("benchmark_scale")

QUICK = dict(gpus="1,2,4,8", rate=150, seconds=30, per_shard=300, listing_shards=100_000,
             saturate_rows=30_000)
FULL = dict(gpus="1,2,4,8", rate=150, seconds=90, per_shard=300, listing_shards=100_000,
            saturate_rows=120_000)
GPUS_PER_NODE = 2
CPUS_PER_NODE = 4  # logical CPUs of each simulated GPU node (the machine has what it has)
SLOW_FACTOR = 10  # the straggler run's slow node runs at a tenth of the others' rate


class StandInPredictor:
    """Takes the predictor's place: ``rate`` rows/s per actor (one simulated GPU), landmarks
    computed from each row's crop so the output is deterministic and checkable."""

    RATE = 150.0
    SLOW_NODE = ""  # a node whose actors run at a tenth of RATE (the straggler run)

    def __init__(self, settings=None, weights_data=None):  # as LandmarkPredictor
        self.version = "standin0standin0"
        self.rate = self.RATE
        if self.SLOW_NODE:
            import ray

            if ray.get_runtime_context().get_node_id() == self.SLOW_NODE:
                self.rate = self.RATE / SLOW_FACTOR
        self.lock = threading.Lock()
        self.info = type("Info", (), {"version": self.version})()
        self.calls, self.rows = 0, 0

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        with self.lock:  # one simulated GPU: concurrent calls queue for it
            time.sleep(n / self.rate)
        self.calls += 1
        self.rows += n
        out = {k: v for k, v in batch.items() if k not in TRAVEL_ONLY}
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        crop = np.asarray(batch["crop"], dtype=np.float64).reshape(n, 3)
        grid = np.linspace(0.1, 0.9, 68, dtype=np.float64)
        points = np.stack([np.broadcast_to(grid, (n, 68)), np.broadcast_to(grid[::-1], (n, 68))],
                          axis=-1)
        landmarks = (crop[:, None, :2] + points * crop[:, None, 2:3]).astype(np.float32)
        landmarks[~ok] = np.nan
        out["landmarks"] = landmarks
        out["model_version"] = np.full(n, self.version, dtype=object)
        return out


def stand_in(rate: float, slow_node: str = "") -> type:
    """A StandInPredictor class running at ``rate`` rows/s (at a tenth of it on ``slow_node``;
    defined here so Ray ships it by value to the actors)."""
    return type("StandInPredictor", (StandInPredictor,), {"RATE": float(rate),
                                                          "SLOW_NODE": slow_node})


def _tiny_jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8)).save(
        out, "JPEG", quality=80)
    return out.getvalue()


def object_store_bytes(nodes: int) -> int:
    """Each of ``nodes`` simulated nodes' object store: Ray's default for a machine of its own
    (30 % of its memory, within /dev/shm), split between the nodes sharing this machine.
    ``ray.cluster_utils.Cluster``'s own default is 150 MiB a node, less than one GPU-sized unit
    (1,024 rows of 224x224x3 crops are 154 MB): nearly every unit, and every block of a Ray Data
    run, would be spilled to disk or wait for room, which no real node does."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    shm = shutil.disk_usage("/dev/shm").total if os.path.isdir("/dev/shm") else memory
    return int(min(0.3 * memory, 0.9 * shm) / max(1, nodes))


def make_shards(folder: Path, shards: int, per_shard: int) -> int:
    """Tar shards of one tiny JPEG each sample, with a box sidecar: the cheapest real input."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg, meta = _tiny_jpeg(), json.dumps({"bbox": [8, 6, 40, 36]}).encode()
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                for ext, data in (("jpg", jpeg), ("json", meta)):
                    info = tarfile.TarInfo(f"s{s:05d}-{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return shards * per_shard


class DriverSampler:
    """The driver process's CPU seconds, its main thread's CPU seconds (where the job's own
    driver code runs; Ray's client threads are the rest) and its resident memory, every
    ``interval`` seconds."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._main_clock = time.pthread_getcpuclockid(threading.main_thread().ident)

    def main_cpu(self) -> float:
        return time.clock_gettime(self._main_clock)

    @staticmethod
    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    @staticmethod
    def rss_mb() -> float:
        with contextlib.suppress(OSError), open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.time(), self.cpu(), self.rss_mb(), self.main_cpu()))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), self.cpu(), self.rss_mb(), self.main_cpu()))

    def cpu_at(self, moment: float, column: int = 1) -> float:
        """CPU seconds (``column`` 1: process, 3: main thread) at ``moment``, interpolated."""
        times = np.asarray([s[0] for s in self.samples])
        cpus = np.asarray([s[column] for s in self.samples])
        return float(np.interp(moment, times, cpus))

    def peak_mb(self) -> float:
        return max(s[2] for s in self.samples)


def _commits(output: Path) -> list[tuple[float, int]]:
    """(commit time, rows) of every completion record, in commit order."""
    out = []
    for path in (output / DONE_DIR).glob("*.json"):
        out.append((path.stat().st_mtime, int(json.loads(path.read_text())["rows"])))
    return sorted(out)


def _steady_window(commits: list[tuple[float, int]], total: int) -> tuple[float, float, int]:
    """(start, end, rows committed in between): from the commit that passes 10 % of the rows
    to the one that passes 90 %, so start-up and the tail do not count."""
    done, start, end, rows = 0, None, None, 0
    for moment, n in commits:
        done += n
        if start is None and done >= 0.1 * total:
            start = moment
        elif start is not None and end is None:
            rows += n
            if done >= 0.9 * total:
                end = moment
    return start, end if end is not None else commits[-1][0], rows


def _steady_rate(commits: list[tuple[float, int]], total: int) -> float | None:
    """Rows/s in steady state: the least-squares slope of rows committed against time, over the
    commits from 10 % to 90 % of the rows (robust to commits that arrive in bursts)."""
    done, points = 0, []
    for moment, n in commits:
        done += n
        if 0.1 * total <= done <= 0.9 * total or not points and done >= 0.1 * total:
            points.append((moment, done))
    if len(points) < 3:
        return None
    t, y = np.asarray(points).T
    return round(float(np.polyfit(t - t[0], y, 1)[0]), 1)


def _commit_cpu_per_row(output: Path) -> tuple[float | None, float | None]:
    """Worker CPU spent committing, per row, from the receipts: over all commits, and without
    each worker process's first (which pays pyarrow's one-time imports, ~0.3-0.5 s)."""
    from pipeline.io.report import read_receipts

    if not (output / "_manifest.json").exists():
        return None, None
    if "receipts" not in json.loads((output / "_manifest.json").read_text()):
        return 0.0, 0.0  # the old design commits on the driver: no worker commit path
    receipts = read_receipts(str(output))
    firsts, warm = set(), []
    for r in receipts:
        if r["worker"] in firsts:
            warm.append(r)
        firsts.add(r["worker"])

    def per_row(rs):
        rows = sum(r["rows"] for r in rs)
        return round(1e6 * sum(r["cpu_s"] for r in rs) / rows, 1) if rows else None

    return per_row(receipts), per_row(warm)


def run_scaling(args, cluster_address: str, workdir: Path) -> list[dict]:
    """One entry per simulated GPU count, then (``--saturate-rows``) one run whose stand-in
    predictor is never the limit, so the machine's cores are: the driver's cost per row when
    rows flow as fast as this machine can read and commit them."""
    import ray

    results = []
    runs = [(int(g), args.rate, None, args.unit_rows) for g in args.gpus.split(",")]
    if args.saturate_rows:
        runs += [(2, 1e6, args.saturate_rows, int(u)) for u in args.saturate_unit_rows.split(",")]
    for gpus, rate, rows, unit_rows in runs:
        predictor = stand_in(rate)
        rows_wanted = rows or int(gpus * rate * args.seconds)
        shards = max(2 * gpus, -(-rows_wanted // args.per_shard))
        input_dir = workdir / f"in-{gpus}"
        output = workdir / f"out-{gpus}"
        total = make_shards(input_dir, shards, args.per_shard)
        cfg = InferConfig(input=str(input_dir), output=str(output), device="gpu",
                          decode="gpu", num_predictors=gpus, batch_size=args.batch_size,
                          unit_rows=unit_rows, ray_address=cluster_address)
        ray.init(address=cluster_address)
        with DriverSampler():  # the idle figure includes the sampler's own ~1-3 ms/s
            idle = _idle_cpu_per_s()
        started = time.time()
        with DriverSampler() as sampler:
            summary = _run(cfg, predictor)
        seconds = time.time() - started
        assert summary.samples == total and summary.errors == 0, summary.line()
        commits = _commits(output)
        first, last, steady_rows = _steady_window(commits, total)
        commit_all, commit_warm = _commit_cpu_per_row(output)
        steady_s = last - first
        cpu_steady = sampler.cpu_at(last) - sampler.cpu_at(first)
        main_steady = sampler.cpu_at(last, 3) - sampler.cpu_at(first, 3)
        cpu_total = sampler.samples[-1][1] - sampler.samples[0][1]
        entry = {
            "gpus": gpus,
            "saturated": rows is not None,
            "unit_rows": unit_rows,
            "rows": total,
            "shards": shards,
            "files": len(commits),
            "units": summary.predictor_calls,
            "leases": summary.placement["leases"],
            "node_agents": summary.placement["agents_started"],
            "cross_node_unit_bytes_fraction":
                summary.placement["cross_node_unit_bytes_fraction"],
            "cross_node_row_bytes_fraction": summary.placement["cross_node_row_bytes_fraction"],
            "seconds": round(seconds, 2),
            "rows_per_s": _steady_rate(commits, total),
            "rows_per_s_overall": round(total / seconds, 1),
            "target_rows_per_s": gpus * rate,
            "driver_cpu_s_per_million_rows": (round(1e6 * cpu_steady / steady_rows, 2)
                                              if steady_rows else None),
            "driver_main_thread_cpu_s_per_million_rows": (
                round(1e6 * main_steady / steady_rows, 2) if steady_rows else None),
            "driver_idle_cpu_s_per_s": round(idle, 4),
            "driver_cpu_s_per_million_rows_above_idle": (
                round(1e6 * (cpu_steady - idle * steady_s) / steady_rows, 2)
                if steady_rows else None),
            "driver_cpu_s_total": round(cpu_total, 2),
            "commit_worker_cpu_us_per_row": commit_all,
            "commit_worker_cpu_us_per_row_warm": commit_warm,
            "driver_peak_mb": round(sampler.peak_mb(), 1),
        }
        log.info("%d GPU(s): %s", gpus, entry)
        results.append(entry)
        shutil.rmtree(input_dir)
        shutil.rmtree(output)
        ray.shutdown()  # each run connects afresh (as each `ray job submit` does)
    return results


def _tail_s(commits: list[tuple[float, int]], total: int) -> float:
    """Seconds from the commit that passes 90 % of the rows to the last commit."""
    done = 0
    for moment, n in commits:
        done += n
        if done >= 0.9 * total:
            return round(commits[-1][0] - moment, 2)
    return 0.0


def run_straggler(args, cluster, workdir: Path) -> dict:
    """The run's tail with one node at a tenth of the others' rate: the same input twice, with
    speculation (leases still running on the slow node near the end are also started on idle
    agents; the first to finish wins) and without."""
    import ray

    from pipeline.stages import leases

    nodes = [n for n in cluster.list_all_nodes() if n is not cluster.head_node]
    slow = nodes[-1].node_id
    gpus = GPUS_PER_NODE * len(nodes)
    input_dir, output = workdir / "in-straggler", workdir / "out-straggler"
    total = make_shards(input_dir, 8 * len(nodes) * 2, args.per_shard)
    result = {"slow_node_rate_factor": 1 / SLOW_FACTOR, "rows": total, "gpus": gpus,
              "rate_per_gpu": args.rate}
    for speculate in (True, False):
        leases.SPECULATE = speculate
        cfg = InferConfig(input=str(input_dir), output=str(output), device="gpu",
                          decode="gpu", batch_size=args.batch_size, unit_rows=args.unit_rows,
                          ray_address=cluster.address)
        ray.init(address=cluster.address)
        started = time.time()
        try:
            summary = _run(cfg, stand_in(args.rate, slow_node=slow))
        finally:
            leases.SPECULATE = True
            ray.shutdown()
        assert summary.samples == total and summary.errors == 0, summary.line()
        commits = _commits(output)
        key = "with_speculation" if speculate else "without"
        result[f"tail_s_{key}"] = _tail_s(commits, total)
        result[f"seconds_{key}"] = round(time.time() - started, 2)
        result[f"leases_{key}"] = summary.placement["leases"]
        result[f"speculated_{key}"] = summary.placement["leases_speculated"]
        result[f"won_by_speculation_{key}"] = summary.placement["leases_won_by_speculation"]
        log.info("straggler, speculation %s: %s", speculate, result)
        shutil.rmtree(output)
    shutil.rmtree(input_dir)
    return result


KILL_TITLES = {  # what each kind of kill looks for: Ray titles a worker process by its work
    "read_task": "ray::_read_units",
    "predictor": "ray::_Predictor",
    "commit": "ray::_commit",
    "node_agent": "ray::_NodeAgent",
}


def _processes(node, title: str) -> list[int]:
    """pids of ``node``'s worker processes whose title starts with ``title``."""
    import psutil
    from ray._private import ray_constants

    try:
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        children = psutil.Process(raylet).children(recursive=True)
    except (KeyError, IndexError, psutil.Error):
        return []
    found = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if " ".join(child.cmdline()).startswith(title):
                found.append(child.pid)
    return found


class ChaosMonkey:
    """Kills, at random moments once rows are committed, read tasks, predictor actors, commit
    tasks and node agents (SIGKILL: an OOM kill, a crash), and removes whole worker nodes
    (a spot preemption), adding a fresh node for each (a node that joins mid-run).

    ``budget``: kills of each kind per run; a predictor actor can be restarted 3 times and a
    task retried 3 times, so a few kills a kind never exceed what a crash budget allows."""

    def __init__(self, cluster, output: Path, seed: int, budget: dict[str, int],
                 interval: tuple[float, float] = (0.5, 2.5), order: list[str] | None = None,
                 node_args: dict | None = None):
        import random

        self.cluster, self.output, self.budget = cluster, output, dict(budget)
        self.rng = random.Random(seed)
        self.interval, self.order = interval, list(order or [])
        self.kills: dict[str, int] = {kind: 0 for kind in budget}
        self.added: list[str] = []  # ids of the nodes that joined
        self.node_args = node_args or {"num_cpus": CPUS_PER_NODE, "num_gpus": GPUS_PER_NODE}

    def _committed(self) -> bool:
        done = self.output / DONE_DIR
        return done.exists() and any(done.iterdir())

    def run(self, finished: threading.Event) -> None:
        """Disturb the job until ``finished`` (in the main thread: Ray starts a node's
        processes from there only)."""
        import signal

        while not finished.is_set() and not self._committed():
            finished.wait(0.05)
        while not finished.wait(self.rng.uniform(*self.interval)):
            kinds = [k for k, left in self.budget.items() if left > 0]
            if not kinds:
                return
            kind = next((k for k in self.order if k in kinds), None) or self.rng.choice(kinds)
            workers = [n for n in self.cluster.list_all_nodes()
                       if n is not self.cluster.head_node]
            if kind == "node":
                victim = self.rng.choice(workers)
                self.cluster.remove_node(victim)
                self.added.append(self.cluster.add_node(**self.node_args).node_id)
            else:
                pids = [p for n in workers for p in _processes(n, KILL_TITLES[kind])]
                if not pids:
                    continue  # nothing of that kind running now: try another moment
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
            self.budget[kind] -= 1
            self.kills[kind] += 1
            log.info("chaos: killed a %s (%s)", kind, self.kills)


def run_beside(job: Callable[[], Any], disturb: Callable[[threading.Event], None]) -> Any:
    """``job()`` in a thread while ``disturb(finished)`` runs in this one; returns the job's
    result, or raises its error."""
    finished, out = threading.Event(), {}

    def target():
        try:
            out["result"] = job()
        except BaseException as exc:  # noqa: BLE001 - raised again below
            out["error"] = exc
        finally:
            finished.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    disturb(finished)
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def output_digest(output: Path) -> dict[str, list[str]]:
    """file -> the sorted hashes of its rows (every column): equal digests, equal outputs."""
    import hashlib

    import pyarrow.parquet as pq

    digest = {}
    for path in sorted(output.glob("*.parquet")):
        rows = pq.read_table(path).to_pylist()
        digest[path.name] = sorted(
            hashlib.sha256(json.dumps(row, sort_keys=True, default=repr).encode()).hexdigest()
            for row in rows)
    return digest


def output_keys(output: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [k for path in sorted(output.glob("*.parquet"))
            for k in pq.read_table(path, columns=["key"]).column("key").to_pylist()]


CHAOS_BUDGET = {"read_task": 3, "predictor": 3, "commit": 3, "node_agent": 2, "node": 1}


def run_chaos(args, cluster, workdir: Path, seeds: list[int], node_args: dict) -> dict:
    """>= ``args.chaos_units`` units on the simulated cluster: one undisturbed run, then one
    run per seed under the chaos monkey; each must equal the undisturbed output."""
    import ray

    unit_rows = 16
    shards = -(-args.chaos_units * unit_rows // args.per_shard) + 1
    input_dir = workdir / "in-chaos"
    total = make_shards(input_dir, shards, args.per_shard)
    expected = sorted(f"s{s:05d}-{i:06d}" for s in range(shards) for i in range(args.per_shard))
    rate = args.chaos_rate

    def one(output: Path, seed: int | None) -> dict:
        cfg = InferConfig(input=str(input_dir), output=str(output), device="gpu",
                          decode="gpu", batch_size=unit_rows, unit_rows=unit_rows,
                          ray_address=cluster.address, stall_timeout=300)
        ray.init(address=cluster.address)
        started = time.time()
        try:
            if seed is None:
                summary, kills = _run(cfg, stand_in(rate)), {}
            else:
                monkey = ChaosMonkey(cluster, output, seed, CHAOS_BUDGET, node_args=node_args)
                summary = run_beside(lambda: _run(cfg, stand_in(rate)), monkey.run)
                kills = monkey.kills
        finally:
            ray.shutdown()
        cluster.wait_for_nodes()
        keys = output_keys(output)
        return {"seconds": round(time.time() - started, 1), "units": summary.predictor_calls,
                "rows": summary.samples, "errors": summary.errors, "kills": kills,
                "placement": summary.placement, "digest": output_digest(output),
                "duplicates": len(keys) - len(set(keys)),
                "missing": len(set(expected) - set(keys))}

    reference = one(workdir / "out-chaos-ref", None)
    assert reference["duplicates"] == reference["missing"] == 0, reference
    result = {"rows": total, "shards": shards, "unit_rows": unit_rows,
              "reference": {k: v for k, v in reference.items() if k != "digest"}, "seeds": []}
    for seed in seeds:
        run = one(workdir / f"out-chaos-{seed}", seed)
        entry = {"seed": seed, "identical": run.pop("digest") == reference["digest"], **run}
        log.info("chaos seed %d: %s", seed, entry)
        result["seeds"].append(entry)
        shutil.rmtree(workdir / f"out-chaos-{seed}")
    shutil.rmtree(workdir / "out-chaos-ref")
    shutil.rmtree(input_dir)
    return result


def _idle_cpu_per_s(seconds: float = 5.0) -> float:
    """What the connected driver costs while it waits (Ray's client threads): the floor under
    the per-row figure at low row rates."""
    before, started = DriverSampler.cpu(), time.time()
    time.sleep(seconds)
    return (DriverSampler.cpu() - before) / (time.time() - started)


def _run(cfg: InferConfig, predictor: type):
    """``run_inference`` with the stand-in predictor in place of the model."""
    return run_inference(cfg, predictor=predictor)


def run_listing(args, workdir: Path) -> dict:
    """List, resume-check and plan ``args.listing_shards`` small shards, without running them."""
    from pipeline.io.resume import completed_pieces
    from pipeline.io.shards import list_shards
    from pipeline.stages.units import ShardTask, plan_read_tasks

    folder = workdir / "many"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(args.listing_shards):
        (folder / f"s{i:07d}.tar").write_bytes(b"x")
    base_mb = DriverSampler.rss_mb()
    with DriverSampler() as sampler:
        t0 = time.time()
        shards = list_shards(str(folder))
        t1 = time.time()
        done = completed_pieces(str(workdir / "many-out"), shards, "v", "s")
        todo = [ShardTask(s) for s in shards if s.name not in done]
        tasks = plan_read_tasks(todo, min_tasks=64)
        t2 = time.time()
    n = len(shards)
    result = {
        "shards": n,
        "list_s": round(t1 - t0, 2),
        "schedule_s": round(t2 - t1, 2),
        "read_tasks": len(tasks),
        "driver_peak_mb": round(sampler.peak_mb(), 1),
        "driver_mb_before": round(base_mb, 1),
        "extrapolated_1m": {
            "note": "linear extrapolation from the measured figures, not measured",
            "list_s": round((t1 - t0) * 1e6 / n, 1),
            "schedule_s": round((t2 - t1) * 1e6 / n, 1),
            "driver_mb_growth": round((sampler.peak_mb() - base_mb) * 1e6 / n, 1),
        },
    }
    shutil.rmtree(folder)
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small run (minutes on 2 cores)")
    p.add_argument("--gpus", help="simulated GPU counts, comma-separated (default 1,2,4,8)")
    p.add_argument("--rate", type=float, help="rows/s of one simulated GPU (default 150)")
    p.add_argument("--seconds", type=float, help="work per GPU count, in seconds of one GPU")
    p.add_argument("--per-shard", type=int, help="samples per tar shard (default 300)")
    p.add_argument("--batch-size", type=int, default=64, help="predictor batch (default 64)")
    p.add_argument("--unit-rows", type=int, default=256,
                   help="rows per unit (default 256, not the job's 4,096 on GPU: many units "
                        "per run, so the driver's cost per unit weighs 16x more per row)")
    p.add_argument("--listing-shards", type=int, help="shards for part 2 (default 100,000)")
    p.add_argument("--saturate-rows", type=int,
                   help="rows of the runs where the cores, not the stand-in, are the limit "
                        "(0: skip them)")
    p.add_argument("--saturate-unit-rows", default="256,4096",
                   help="unit sizes of the saturated runs, comma-separated (the driver's cost "
                        "must not depend on them)")
    p.add_argument("--straggler", action="store_true",
                   help="also run the tail with one node at a tenth of the others' rate, with "
                        "and without speculation")
    p.add_argument("--chaos", help="seeds, comma-separated: runs of >= --chaos-units units "
                                   "with kills of every kind, compared to an undisturbed run "
                                   "(writes chaos.json)")
    p.add_argument("--chaos-units", type=int, default=1000)
    p.add_argument("--chaos-rate", type=float, default=400,
                   help="rows/s of one simulated GPU in the chaos runs (default 400)")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--skip-listing", action="store_true")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", default="benchmark-results", help="folder for scale.json")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.stages import leases

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    args = parse(argv)
    # These tiny JPEGs are ~1 % of a photo's bytes: without a floor on lease size, the input is
    # cut into as many leases as a real archive of the same images would be (~4 per agent).
    leases.MIN_LEASE_BYTES = 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="scale-"))
    gpus = max(int(g) for g in args.gpus.split(","))
    nodes = -(-gpus // GPUS_PER_NODE)
    store = object_store_bytes(nodes + 1)
    worker = {"num_cpus": CPUS_PER_NODE, "num_gpus": GPUS_PER_NODE, "object_store_memory": store}
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "object_store_memory": store})
    for _ in range(nodes):
        cluster.add_node(**worker)
    cluster.wait_for_nodes()
    try:
        result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}}
        result["settings"].update(nodes=len(cluster.list_all_nodes()),
                                  gpus_per_node=GPUS_PER_NODE, cpus_per_node=CPUS_PER_NODE,
                                  machine_cpus=os.cpu_count())
        if not args.skip_scaling:
            result["scaling"] = run_scaling(args, cluster.address, workdir)
        if args.straggler:
            result["straggler"] = run_straggler(args, cluster, workdir)
        if args.chaos:
            chaos = run_chaos(args, cluster, workdir, [int(s) for s in args.chaos.split(",")],
                              worker)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "chaos.json").write_text(json.dumps(chaos, indent=2))
            result["chaos"] = {"seeds": [{k: e[k] for k in ("seed", "identical", "duplicates",
                                                             "missing", "kills")}
                                         for e in chaos["seeds"]]}
        if not args.skip_listing:
            result["listing"] = run_listing(args, workdir)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    scaling = result.get("scaling") or [{"rows_per_s": 0, "gpus": 1}]
    base = scaling[0]["rows_per_s"] or 0
    for entry in result.get("scaling", []):
        ideal = base * entry["gpus"] / scaling[0]["gpus"]
        entry["scaling_efficiency"] = (round(entry["rows_per_s"] / ideal, 3)
                                       if ideal and not entry["saturated"] else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


def table(result: dict) -> str:
    lines = ["gpus | unit rows | units / leases | rows/s steady (ideal) | overall | efficiency | "
             "driver CPU s/M rows (above idle; main thread) | commit worker us/row (warm) | "
             "driver peak MB | cross-node unit / row bytes"]
    for e in result.get("scaling", []):
        gpus = f"{e['gpus']}{' saturated' if e['saturated'] else ''}"
        lines.append(f"{gpus} | {e['unit_rows']} | {e['units']} / {e['leases']} | "
                     f"{e['rows_per_s']} ({e['target_rows_per_s']:.0f}) | "
                     f"{e['rows_per_s_overall']} | {e['scaling_efficiency']} | "
                     f"{e['driver_cpu_s_per_million_rows']} "
                     f"({e['driver_cpu_s_per_million_rows_above_idle']}; "
                     f"{e['driver_main_thread_cpu_s_per_million_rows']}) | "
                     f"{e['commit_worker_cpu_us_per_row']} "
                     f"({e['commit_worker_cpu_us_per_row_warm']}) | {e['driver_peak_mb']} | "
                     f"{e['cross_node_unit_bytes_fraction']} / "
                     f"{e['cross_node_row_bytes_fraction']}")
    if "straggler" in result:
        st = result["straggler"]
        lines.append(f"straggler (one node at {st['slow_node_rate_factor']:g}x): tail "
                     f"{st['tail_s_with_speculation']} s with speculation, "
                     f"{st['tail_s_without']} s without; whole run "
                     f"{st['seconds_with_speculation']} s / {st['seconds_without']} s")
    for e in result.get("chaos", {}).get("seeds", []):
        lines.append(f"chaos seed {e['seed']}: identical {e['identical']}, duplicates "
                     f"{e['duplicates']}, missing {e['missing']}, kills {e['kills']}")
    if "listing" in result:
        li = result["listing"]
        lines.append(f"listing {li['shards']} shards: list {li['list_s']} s, schedule "
                     f"{li['schedule_s']} s, driver peak {li['driver_peak_mb']} MB "
                     f"(1M extrapolated: {li['extrapolated_1m']})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
