"""Run by test_recovery.py in its own process: the inference job on a 3-node
ray.cluster_utils.Cluster (a head and two workers), one worker node removed mid-run."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.inference.config import InferConfig
from pipeline.inference.job import run_inference


def main(input_dir: str, output_dir: str, weights: str) -> None:
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
    while not (done.exists() and any(done.iterdir())):
        if time.time() > deadline or not thread.is_alive():
            raise SystemExit("no shard was committed before the node was to be removed")
        time.sleep(0.05)
    committed_before = len(list(done.iterdir()))
    cluster.remove_node(workers[0])
    result["removed_node_after_shards"] = committed_before
    thread.join(timeout=600)
    result["alive_nodes"] = sum(1 for n in ray.nodes() if n["Alive"])
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
