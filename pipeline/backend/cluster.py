"""The cluster, as both jobs see it: connect (or start local Ray), count its CPUs and GPUs, and
decide whether a job runs its model on GPUs. Inference and fine-tuning call these; a Ray upgrade
that changes how a job joins a cluster changes this file."""

from __future__ import annotations

import logging
import os

from pipeline.config.errors import BadInput

log = logging.getLogger("pipeline")

# Times Ray reruns a task that its memory monitor killed. Ray's default (-1) is for ever, and
# these retries do not count against the task's max_retries: a task that needs more memory than
# the node has would be killed and rerun without end, and the job would never finish.
OOM_TASK_RETRIES = 3


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at ``address`` / ``RAY_ADDRESS`` or start a local Ray instance.

    Caps the retries of tasks killed for memory at ``OOM_TASK_RETRIES`` (a task this job
    submits then fails, and the run stops with its cause) unless ``RAY_task_oom_retries`` is
    set. Ray reads that setting in the process that submits a task, when it connects: the cap
    holds for the tasks this driver submits (inference's read and commit tasks) on any cluster,
    and for every task of a local instance started here; the deploy image sets it for all."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_task_oom_retries", str(OOM_TASK_RETRIES))
    address = address or os.environ.get("RAY_ADDRESS") or None
    log.info("connecting to Ray at %s", address) if address else log.info("starting local Ray")
    ray.init(address=address)


def cluster_resources() -> tuple[float, int]:
    """(CPUs, GPUs) of the cluster."""
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0)), int(resources.get("GPU", 0))


def largest_node_cpus() -> float:
    """CPUs of the alive node with the most (one actor runs on one node)."""
    import ray

    return max((float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")),
               default=0.0)


def wants_gpu(device: str, cluster_gpus: int) -> bool:
    """Whether a job with ``--device device`` runs on GPUs; a clear error when it asks for CUDA
    on a cluster without any."""
    use_gpu = device == "gpu" or (device == "auto" and cluster_gpus > 0)
    if use_gpu and cluster_gpus == 0:
        raise BadInput("--device gpu was asked for but the Ray cluster has no GPUs")
    return use_gpu
