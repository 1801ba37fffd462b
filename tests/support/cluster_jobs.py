"""Run by the tests in a process of their own, each on a ray.cluster_utils.Cluster that does not
meet the test session's Ray; prints one ``RESULT {json}`` line.

    python tests/support/cluster_jobs.py one-cpu INPUT OUTPUT WEIGHTS
        the inference job on a cluster of one CPU
    python tests/support/cluster_jobs.py oom-cap
        tasks killed by Ray's memory monitor, on a node whose kill threshold is just above
        what is in use now
    python tests/support/cluster_jobs.py chaos WORKDIR
        a head and two simulated GPU nodes, the stand-in predictor of jobs/benchmark_scale.py:
        an undisturbed run, a run under the chaos monkey (a node removed and another added, a
        node agent, a predictor, a read task and a commit killed), and a run during which a
        node is drained and then removed
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import ray
from ray.cluster_utils import Cluster

from pipeline.backend.cluster import ensure_ray
from pipeline.backend.executor import READ_TASK_RETRIES
from pipeline.inference.config import InferConfig
from pipeline.inference.job import run_inference


def one_cpu(input_dir: str, output_dir: str, weights: str) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray.init(address=cluster.address)
    summary = run_inference(InferConfig(input=input_dir, output=output_dir, weights=weights,
                                        batch_size=2, stall_timeout=120))
    result = {"samples": summary.samples, "errors": summary.errors,
              "cluster_cpus": ray.cluster_resources().get("CPU")}
    ray.shutdown()
    cluster.shutdown()
    return result


GB = 1 << 30


def oom_cap() -> dict:
    memory = psutil.virtual_memory()
    in_use = (memory.total - memory.available) / memory.total
    # Set before the node starts (its raylet reads them): kill above in-use + 1.5 GB.
    os.environ["RAY_memory_usage_threshold"] = f"{in_use + 1.5 * GB / memory.total:.4f}"  # noqa: SIM112 (Ray's name)
    os.environ["RAY_memory_monitor_refresh_ms"] = "100"  # noqa: SIM112
    os.environ.pop("RAY_task_oom_retries", None)  # the cluster has no cap of its own
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    ensure_ray(cluster.address)  # what the jobs call
    attempts = tempfile.mkdtemp()

    @ray.remote(max_retries=READ_TASK_RETRIES)
    def needs_3_gb(i: int) -> int:
        Path(attempts, f"{i}-{time.time_ns()}").touch()
        block = bytearray(3 * GB)
        for at in range(0, len(block), 4096):  # touch every page
            block[at] = 1
        time.sleep(10)
        return len(block)

    started = time.time()
    outcomes = []
    for ref in [needs_3_gb.remote(i) for i in range(2)]:
        try:
            ray.get(ref, timeout=150)
            outcomes.append("finished")
        except Exception as exc:  # noqa: BLE001 - the class name is the result
            outcomes.append(type(exc).__name__)
    result = {"outcomes": outcomes, "attempts": len(os.listdir(attempts)),
              "seconds": round(time.time() - started, 1),
              "driver_setting": os.environ.get("RAY_task_oom_retries")}  # noqa: SIM112
    ray.shutdown()
    cluster.shutdown()
    return result


def chaos(workdir: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
    import benchmark_scale as bs
    import ray.cloudpickle
    from ray.core.generated import autoscaler_pb2

    from pipeline.io.report import read_receipts
    from pipeline.stages import leases

    ray.cloudpickle.register_pickle_by_value(bs)  # the workers cannot import jobs/
    leases.MIN_LEASE_BYTES = 1  # a small input in several leases, as a big one would be
    work = Path(workdir)
    node_args = {"num_cpus": 3, "num_gpus": 1}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    total = bs.make_shards(work / "in", 12, 40)
    expected = {f"s{s:05d}-{i:06d}" for s in range(12) for i in range(40)}

    def run(name: str, during=None) -> dict:
        cfg = InferConfig(input=str(work / "in"), output=str(work / name), device="gpu",
                          decode="gpu", batch_size=4, unit_rows=4, ray_address=cluster.address,
                          stall_timeout=120)
        ray.init(address=cluster.address)
        try:
            if during is None:
                summary = run_inference(cfg, predictor=bs.stand_in(30))
            else:
                what = during(work / name)
                summary = bs.run_beside(lambda: run_inference(cfg, predictor=bs.stand_in(30)),
                                        what.run)
        finally:
            ray.shutdown()
        cluster.wait_for_nodes()
        keys = bs.output_keys(work / name)
        return {"samples": summary.samples, "errors": summary.errors,
                "units": summary.predictor_calls, "placement": summary.placement,
                "digest": bs.output_digest(work / name),
                "duplicates": len(keys) - len(set(keys)), "missing": len(expected - set(keys)),
                "receipt_nodes": dict(Counter(r["node"] for r in read_receipts(str(work / name)))),
                "receipt_files": len(read_receipts(str(work / name))),
                "during": during and what.report()}

    class Monkey(bs.ChaosMonkey):
        def report(self):
            return {"kills": self.kills, "added": self.added}

    def monkey(output):
        return Monkey(cluster, output, seed=5, interval=(0.3, 0.8), node_args=node_args,
                      budget={"node": 1, "node_agent": 1, "predictor": 1, "read_task": 1,
                              "commit": 1},
                      order=["node", "node_agent", "predictor", "read_task"])

    class Drain:
        """After the first commit, drain a worker node (as a spot notice does), then remove it
        at the deadline 5 s later (the preemption itself) and add another."""

        def __init__(self, output):
            self.output, self.drained, self.removed = output, None, False

        def run(self, finished):
            done = self.output / "_done"
            while not (done.exists() and any(done.iterdir())) and not finished.is_set():
                time.sleep(0.05)
            workers = [n for n in cluster.list_all_nodes() if n is not cluster.head_node]
            victim = workers[0]
            gcs = ray._private.worker.global_worker.gcs_client
            accepted, _ = gcs.drain_node(
                victim.node_id, autoscaler_pb2.DrainNodeReason.Value(
                    "DRAIN_NODE_REASON_PREEMPTION"), "spot preemption (test)",
                int(time.time() * 1000) + 5000)
            self.drained = accepted and victim.node_id
            time.sleep(5)
            cluster.remove_node(victim)
            cluster.add_node(**node_args)
            self.removed = True

        def report(self):
            return {"drained": self.drained, "removed": self.removed}

    result = {"rows": total, "reference": run("ref"), "chaos": run("chaos", monkey),
              "drain": run("drain", Drain)}
    for name in ("chaos", "drain"):
        result[name]["identical"] = result[name].pop("digest") == result["reference"]["digest"]
    result["reference"].pop("digest")
    cluster.shutdown()
    return result


if __name__ == "__main__":
    jobs = {"one-cpu": one_cpu, "oom-cap": oom_cap, "chaos": chaos}
    print("RESULT " + json.dumps(jobs[sys.argv[1]](*sys.argv[2:])), flush=True)
