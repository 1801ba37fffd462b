"""The inference job: list shards, skip what is done, run the units on Ray, report receipts.

The driver lists the input once, reads the completion records of an earlier run, groups the shards
still to do into read tasks (``pipeline.stages.units``) and hands them to
``pipeline.backend.executor.UnitRunner``, which moves each unit from a read task through a predictor
actor to the commit tasks that write its pieces. The driver never holds a row: it receives one small
receipt per committed file, for the progress line, the summary and the manifest.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pipeline.config.errors import BadInput
from pipeline.config.files import CONFIG_FILE
from pipeline.inference.config import (
    DEFAULT_BATCH_SIZE,
    GPU_UNIT_ROWS,
    UNIT_BATCHES,
    InferConfig,
)
from pipeline.io.lease import Lease
from pipeline.io.progress import Progress
from pipeline.io.report import (
    ManifestWriter,
    Summary,
    new_run_id,
    run_figures,
    write_manifest,
)
from pipeline.io.resume import (
    claim_output,
    completed_pieces,
    input_root,
    list_output,
    remove_stale_temporary_files,
    retire_stale_outputs,
    settings_id,
)
from pipeline.io.shards import list_shards
from pipeline.io.storage import check_writable, read_bytes, redact
from pipeline.model.identity import model_identity
from pipeline.model.precision import resolve_precision
from pipeline.stages.commit import CommitSettings
from pipeline.stages.detect import ImageSettings
from pipeline.stages.faults import plan_from_env
from pipeline.stages.leases import MIN_FREE_CPUS, NodeSlots, Placement, split_free_cpus
from pipeline.stages.predictor import LandmarkPredictor, PredictorSettings
from pipeline.stages.reader import ReaderSettings
from pipeline.stages.units import ShardTask

log = logging.getLogger("pipeline")

# --decode auto: decode on the GPU unless the CPUs beside each GPU can decode as fast as the
# GPU runs the model. Measured (docs/benchmarks.md): PIL decode + crop/resize of a 640x480
# JPEG on one core 158 images/s; the model 7,923 images/s per H100 (bf16) -> ~50 cores/GPU.
CPU_DECODE_IMAGES_PER_S = 158
GPU_MODEL_IMAGES_PER_S = 7_923


def run_inference(cfg: InferConfig, job_config: Mapping[str, Any] | None = None, *,
                  predictor: type = LandmarkPredictor) -> Summary:
    """Run the whole job and return its summary; output files are committed piece by piece.

    Pieces completed by an earlier run with the same model and settings are skipped unless
    ``cfg.force``. ``job_config`` (the resolved command-line config) is saved as
    ``OUTPUT/_config.yaml`` once the input is listed and the model loads, so a job that fails
    its checks leaves nothing behind. ``predictor`` is the class the actors run (the
    benchmarks put a stand-in there)."""

    started = time.time()
    start_iso = datetime.now(timezone.utc).isoformat(timespec="seconds")
    output = cfg.output.rstrip("/")
    shards = list_shards(cfg.input, cfg.format, cfg.storage_options, cfg.files_per_shard)
    log.info("found %d %s shard(s) under %s", len(shards), shards[0].format, cfg.input)
    # The model's identity only (no torch, no network on the driver): a missing or bad model
    # file fails here, before any cluster work. The file's bytes are read once, here: its
    # version comes from them and every predictor actor gets them (not the URI), so a file
    # replaced during the run changes nothing in it (pipeline.model.identity).
    weights_data = _read_weights(cfg.weights, cfg.storage_options) if cfg.weights else None
    model_info = model_identity(cfg.weights, cfg.init, cfg.storage_options, cfg.seed,
                                weights_data)
    log.info("model %s from %s", model_info.version, model_info.source)
    settings = settings_id(cfg.result_settings())
    faults = plan_from_env()  # failure tests only (pipeline.stages.faults); empty otherwise

    check_writable(output, cfg.storage_options)  # a denied output fails here, not at a commit
    run_id = new_run_id()
    # One run at a time on an output: a live run's lease makes this one stop here (exit 2).
    with Lease(output, run_id, cfg.storage_options, break_lease=cfg.break_lease) as lease:
        return _run(cfg, job_config, predictor, output=output, shards=shards,
                    model_info=model_info, settings=settings, faults=faults, run_id=run_id,
                    lease=lease, started=started, start_iso=start_iso,
                    weights_data=weights_data)


def _read_weights(uri: str, storage_options: Mapping[str, Any]) -> bytes:
    try:
        return read_bytes(uri, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"model file not found: {redact(uri)}") from None


def _run(cfg: InferConfig, job_config, predictor: type, *, output: str, shards, model_info,
         settings: str, faults: str, run_id: str, lease: Lease, started: float,
         start_iso: str, weights_data: bytes | None = None) -> Summary:
    """The job once it holds the output's lease: resume, run the units, report."""
    from pipeline.backend import cluster, executor, metrics

    claim_output(output, input_root(shards), cfg.force, cfg.storage_options)
    remove_stale_temporary_files(output)
    if job_config is not None:
        from pipeline.config.files import save_config

        save_config(job_config, f"{output}/{CONFIG_FILE}", cfg.storage_options)
        log.info("resolved config saved to %s/%s (reuse it with --config)", output, CONFIG_FILE)
    present = list_output(output, cfg.storage_options)  # once: resume and retiring use it
    progress = {} if cfg.force else completed_pieces(output, shards, model_info.version,
                                                     settings, cfg.storage_options, present)
    finished = {name for name, p in progress.items() if p.finished}
    todo = [ShardTask(s, frozenset(progress[s.name].pieces) if s.name in progress else
                      frozenset()) for s in shards if s.name not in finished]
    if progress:
        log.info("%d shard(s) already done for model %s with these settings: skipped "
                 "(--force redoes them); %d to do", len(finished), model_info.version,
                 len(todo))

    summary = Summary(len(shards), 0, 0, 0.0, model_info.version, output, [],
                      skipped_shards=len(finished), max_error_fraction=cfg.max_error_fraction,
                      skipped_rows=sum(p.rows for p in progress.values()),
                      skipped_errors=sum(p.errors for p in progress.values()))
    manifest = ManifestWriter(output, run_id, cfg.storage_options)
    stats = None
    if todo:
        cluster.ensure_ray(cfg.ray_address)
        cpus, gpus = cluster.cluster_resources()
        p = plan(cfg, cpus, gpus, node_cpus=cluster.largest_node_cpus())
        actors = p.predictors
        log.info("predictors: %s %s actor(s) (%g GPU each), batch size %d, %s, %g CPU each, %d "
                 "call(s) at once; units of up to %d rows; decoding on the %s%s",
                 actors.count if not actors.elastic else f"{actors.count} (one per GPU, as "
                 "nodes come and go)", "GPU" if p.use_gpu else "CPU", actors.actor_gpus,
                 p.batch_size, p.precision, actors.actor_cpus, actors.concurrency, p.unit_rows,
                 "GPU" if p.decode == "gpu" else "CPU", ", model compiled" if cfg.compile else "")
        if p.decode == "gpu" and not p.use_gpu:
            log.info("--decode gpu without GPUs: the CPU predictor actor decodes (torchvision)")
        # A live line on a terminal, a log line every 10 s elsewhere (pipeline/io/progress.py).
        shown = Progress(((t.shard.name, t.shard.size) for t in todo), summary)

        def on_receipts(receipts: list[dict[str, Any]]) -> None:
            lease.check()  # taken over by another run: stop before it writes more
            for receipt in receipts:
                summary.add(receipt)
                metrics.committed(receipt)
                manifest.add(receipt)
                shown.add(receipt)
                log.debug("committed %s: %d rows, %d errors", receipt["file"], receipt["rows"],
                          receipt["errors"])
            shown.show()

        try:  # the live line hands the terminal back however the run ends
            runner = executor.LeaseRunner(
                actors, reader_settings(cfg, p, faults), predictor,
                predictor_settings(cfg, p, faults, model_info.version),
                CommitSettings(output, model_info.version, settings, cfg.rows_per_file,
                                      dict(cfg.storage_options), faults, lease.token),
                on_receipts=on_receipts, stall_timeout=cfg.stall_timeout,
                weights_data=weights_data)
            stats = runner.run(todo)
        finally:
            shown.close()
        summary.placement = {**runner.lease_figures(), **stats.cross_node_fractions(),
                             "unit_bytes": stats.unit_bytes, "row_bytes": stats.row_bytes,
                             "read_tasks": stats.read_tasks}
        log.info("%d lease(s) on %d node agent(s) (%d lost with their agent, %d started "
                 "twice near the end); bytes between nodes: %s",
                 summary.placement["leases"], summary.placement["agents_started"],
                 summary.placement["leases_lost"], summary.placement["leases_speculated"],
                 stats.cross_node_fractions())
        summary.predictor_calls = stats.units
        summary.rows_per_call = stats.call_sizes()
        summary.device_decoded, summary.cpu_fallbacks = stats.device_decoded, stats.cpu_fallbacks
        log.info("predictor calls: %d, rows per call %s", stats.units, summary.rows_per_call)
        if stats.fallback_warning():
            log.warning("%s", stats.fallback_warning())

    # Files of shards the input no longer has (a deleted tar, a loose-image group gone) would
    # hold keys a second time next to the current files: they move to _retired/<run>/.
    retire_stale_outputs(output, cfg.input, shards, model_info.version, settings, run_id,
                         set(summary.failed_shards), cfg.storage_options, present)
    ended = time.time()
    run_figures(summary, stats, ended, cfg.gpu_hour_price)
    summary.seconds = ended - started
    summary.files.sort()
    write_manifest(cfg.public_dict(), summary, manifest, start_iso, cfg.storage_options)
    summary.report = _write_report(output, run_id, cfg.storage_options, shards)
    return summary


def _write_report(output: str, run_id: str, storage_options, shards) -> str | None:
    """The run's page (``pipeline.report.run``); a report that cannot be written is a warning,
    not a failed run: the rows and the manifest are committed already."""
    from pipeline.report.run import write_run_report

    try:
        uri = write_run_report(output, run_id, storage_options, shards)
    except Exception as exc:  # noqa: BLE001 - see above; the manifest has every figure
        log.warning("the run report could not be written (%s: %s); `landmarks report %s "
                    "--run %s` tries again", type(exc).__name__, exc, output, run_id)
        return None
    log.info("run report: %s", uri)
    return uri


def image_settings(cfg: InferConfig) -> ImageSettings:
    return ImageSettings(cfg.margin, cfg.max_pixels, cfg.face_threshold, cfg.max_faces,
                         cfg.min_face_size)


def reader_settings(cfg: InferConfig, p: Plan, faults: str = "") -> ReaderSettings:
    """What every read task of the run gets."""
    return ReaderSettings(
        storage_options=dict(cfg.storage_options), images=image_settings(cfg), decode=p.decode,
        detect=cfg.detect, image_column=cfg.image_column, key_column=cfg.key_column,
        max_image_bytes=cfg.max_image_bytes, unit_rows=p.unit_rows, unit_bytes=cfg.unit_bytes,
        rows_per_file=cfg.rows_per_file, faults=faults)


def predictor_settings(cfg: InferConfig, p: Plan, faults: str = "",
                       expected_version: str | None = None) -> PredictorSettings:
    """What every predictor actor of the run gets."""
    return PredictorSettings(
        weights=cfg.weights, init=cfg.init, seed=cfg.seed,
        storage_options=dict(cfg.storage_options), device="cuda" if p.use_gpu else "cpu",
        # The core left to the read tasks is mostly idle on CPU (decoding is ~100x cheaper
        # than the CPU forward pass), so the model threads use it too: 2 threads run the
        # forward pass ~1.9x faster than 1 on a 2-core machine.
        num_threads=None if p.use_gpu else math.ceil(p.predictors.actor_cpus) + 1,
        micro_batch=p.batch_size, compile=cfg.compile, precision=p.precision,
        images=image_settings(cfg), expected_version=expected_version, faults=faults)


@dataclass(frozen=True)
class Plan:
    """How the job runs on this cluster: the choices the ``auto`` settings resolve to.
    ``slots``: the read and commit tasks the whole cluster runs at once beside the predictors
    (each node agent works out its own share the same way, ``leases.node_slots``)."""

    use_gpu: bool
    decode: str
    batch_size: int
    unit_rows: int
    precision: str
    predictors: Placement
    slots: NodeSlots


def plan(cfg: InferConfig, cluster_cpus: float, cluster_gpus: int,
         node_cpus: float | None = None) -> Plan:
    """Resolve device, decode mode, batch and unit sizes, and how many of each worker run at
    once with which CPUs, for a cluster of ``cluster_cpus`` CPUs and ``cluster_gpus`` GPUs.

    CPUs go to the predictor actors first, then a reserve for commits, and the rest to read
    tasks (at least one, with a fraction of a CPU if that is all there is): so a read task never
    takes the CPU a commit needs, and the job makes progress on any cluster with a CPU."""
    from pipeline.backend.cluster import wants_gpu  # Ray-free; imported where the job uses it

    use_gpu = wants_gpu(cfg.device, cluster_gpus)
    if cluster_cpus <= 0:
        raise BadInput("the Ray cluster has no CPUs: read and commit tasks need at least one")
    decode = cfg.decode
    if decode == "auto":
        # One GPU outruns ~50 cores of PIL decoding; below that the GPU decodes (nvJPEG).
        fast_enough = cluster_cpus * CPU_DECODE_IMAGES_PER_S >= max(
            cluster_gpus, 1) * GPU_MODEL_IMAGES_PER_S
        decode = "gpu" if use_gpu and not fast_enough else "cpu"
    key = ("cuda+compile" if cfg.compile else "cuda") if use_gpu else "cpu"
    batch_size = cfg.batch_size or DEFAULT_BATCH_SIZE[key]
    actor_gpus = cfg.gpus_per_predictor if use_gpu else 0.0
    most = int(cluster_gpus / actor_gpus + 1e-9) if use_gpu else 0  # actors the GPUs can hold
    pool_size = cfg.num_predictors or (most if use_gpu else 1)
    if use_gpu and pool_size > most:
        # Ray would start the actors it can place and leave the rest pending for ever.
        raise BadInput(
            f"--num-predictors {pool_size} with --gpus-per-predictor {actor_gpus:g} needs "
            f"{pool_size * actor_gpus:g} GPUs, but the Ray cluster has {cluster_gpus}: lower "
            f"--num-predictors to {most} or fewer, or share "
            "each GPU between actors with --gpus-per-predictor 0.5")
    # CPU inference: one actor with all but one core (the other reads and decodes); GPU:
    # 1 CPU per actor (its host work: batching, copies, and the CPU decode fallback). Never
    # all of the cluster's CPUs: the read and commit tasks need some.
    # ``node_cpus``: the largest node's CPUs (an actor runs on one node); the read and commit
    # slots below are the whole cluster's, each node agent works out its own share.
    node_cpus = cluster_cpus if node_cpus is None else min(node_cpus, cluster_cpus)
    actor_cpus = cfg.cpus_per_predictor or (1 if use_gpu else max(1, node_cpus - 1))
    actor_cpus = min(actor_cpus, (cluster_cpus - MIN_FREE_CPUS) / pool_size,
                     node_cpus - MIN_FREE_CPUS)
    return Plan(
        use_gpu=use_gpu,
        decode=decode,
        batch_size=batch_size,
        unit_rows=cfg.unit_rows or (GPU_UNIT_ROWS if use_gpu else UNIT_BATCHES * batch_size),
        precision=resolve_precision(cfg.precision, "cuda" if use_gpu else "cpu"),
        predictors=Placement(
            pool_size, actor_cpus, actor_gpus,
            # GPU: two calls at once per actor, so one batch's host work and copy overlap the
            # other's GPU work (each thread has its own CUDA streams); CPU: one (it owns the
            # cores).
            concurrency=cfg.calls_per_predictor or (2 if use_gpu else 1),
            elastic=use_gpu and not cfg.num_predictors),
        slots=NodeSlots(pool_size, *split_free_cpus(cluster_cpus - pool_size * actor_cpus,
                                                    pool_size)),
    )
