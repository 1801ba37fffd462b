"""Run by the tests in a process of their own, each on a ray.cluster_utils.Cluster that does not
meet the test session's Ray; prints one ``RESULT {json}`` line.

    python tests/cluster_jobs.py node-loss INPUT OUTPUT WEIGHTS
        a head and two worker nodes; the node whose predictor is busy is removed mid-run
    python tests/cluster_jobs.py one-cpu INPUT OUTPUT WEIGHTS
        the inference job on a cluster of one CPU
    python tests/cluster_jobs.py oom-cap
        tasks killed by Ray's memory monitor, on a node whose kill threshold is just above
        what is in use now
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from pipeline.backend.cluster import ensure_ray
from pipeline.backend.executor import READ_TASK_RETRIES
from pipeline.inference.config import InferConfig
from pipeline.inference.job import run_inference


def _predictors(node) -> dict[int, str]:
    """pid -> process title of the predictor actors a node runs (its raylet's children): Ray
    titles an actor's process ``ray::<class>`` and ``ray::<class>.<method>`` while it works."""
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    found = {}
    for child in psutil.Process(raylet).children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        if title.startswith("ray::_Predictor"):
            found[child.pid] = title
    return found


def node_loss(input_dir: str, output_dir: str, weights: str) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    result = {}

    def job():
        cfg = InferConfig(input=input_dir, output=output_dir, weights=weights, batch_size=2,
                          num_predictors=1, predictor_cpus=1)
        summary = run_inference(cfg)
        result.update(samples=summary.samples, errors=summary.errors)

    thread = threading.Thread(target=job)
    thread.start()
    done = Path(output_dir) / "_done"
    deadline = time.time() + 300
    # Wait for a committed shard and for the predictor to be busy with the next unit, then
    # remove the node it runs on: a unit is lost in flight there and must be predicted again.
    while True:
        if time.time() > deadline or not thread.is_alive():
            raise SystemExit("the predictor was never seen busy after a first commit")
        busy = [(node, pid, title) for node in workers
                for pid, title in _predictors(node).items() if ".predict" in title]
        if busy and done.exists() and any(done.iterdir()):
            break
        time.sleep(0.02)
    removed, old_pid, title = busy[0]
    result["removed_node_after_shards"] = len(list(done.iterdir()))
    result["busy_title"] = title
    cluster.remove_node(removed)
    survivor = next(node for node in workers if node is not removed)
    restarted = {}
    while thread.is_alive():  # the actor comes back on the other node and does the rest
        restarted.update(_predictors(survivor))
        time.sleep(0.05)
    thread.join()
    result["killed_predictor_gone"] = not psutil.pid_exists(old_pid)
    result["predictor_restarted_on_survivor"] = bool(restarted)
    result["alive_nodes"] = sum(1 for n in ray.nodes() if n["Alive"])
    ray.shutdown()
    cluster.shutdown()
    return result


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


if __name__ == "__main__":
    jobs = {"node-loss": node_loss, "one-cpu": one_cpu, "oom-cap": oom_cap}
    print("RESULT " + json.dumps(jobs[sys.argv[1]](*sys.argv[2:])), flush=True)
