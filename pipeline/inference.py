"""The inference job: shards -> Ray Data (read+preprocess tasks, predictor actor pool) -> Parquet.

The only module of the inference path that imports Ray. The driver lists the shards once, runs
the dataset, and commits each shard's output file as soon as all of that shard's rows are in
(every row carries its position ``seq`` and the shard's final row is flagged ``last``), so output
appears while the job runs and a shard's file is never written twice in one run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline.model import load_model
from pipeline.output import output_file_name, rows_to_table, write_table_atomic
from pipeline.preprocess import DEFAULT_MARGIN, DEFAULT_MAX_PIXELS
from pipeline.report import Summary, write_manifest
from pipeline.resume import (
    SHARD_FAILURE_KINDS,
    completed_shards,
    remove_stale_temporary_files,
    settings_id,
    write_completion_record,
)
from pipeline.shards import Shard, list_shards
from pipeline.stages import LandmarkPredictor, ShardReader, empty_rows, encode_shard

log = logging.getLogger("pipeline")

DEVICES = ("auto", "cuda", "cpu")
DECODES = ("auto", "cpu", "gpu")
CONFIG_FILE = "_config.yaml"
READ_TASK_RETRIES = 3
ACTOR_RESTARTS = 3
# Batch sizes by device (model batch = Ray Data batch); ../shared/DESIGN.md measured the model
# on an H100 at batch 512 in bf16 eager (7,923 images/s) and 256 compiled (13,618). On CPU the
# batch is mostly latency: on 2 cores VGG16 ran 1.84 / 1.94 / 2.08 images/s at batch 8 / 16 /
# 64, so 16 gives results (and progress) 4x sooner than 64 for 7 % less throughput.
DEFAULT_BATCH_SIZE = {"cuda": 512, "cuda+compile": 256, "cpu": 16}
# --decode auto: decode on the GPU unless the CPUs beside each GPU can decode as fast as the
# GPU runs the model. Measured (../shared/DESIGN.md): PIL decode + crop/resize of a 640x480 JPEG
# on one core 158 images/s; the model 7,923 images/s per H100 (bf16) -> ~50 cores per GPU.
CPU_DECODE_IMAGES_PER_S = 158
GPU_MODEL_IMAGES_PER_S = 7_923


@dataclass(frozen=True)
class InferConfig:
    """Everything the inference job needs; built by the CLI (``pipeline.cli``)."""

    input: str
    output: str
    weights: str | None = None
    init: str = "random"
    seed: int = 0
    format: str = "auto"
    image_column: str = "image"
    key_column: str = "key"
    files_per_shard: int = 256
    margin: float = DEFAULT_MARGIN
    max_pixels: int = DEFAULT_MAX_PIXELS
    batch_size: int | None = None  # None: DEFAULT_BATCH_SIZE for the device
    read_batch_rows: int = 32
    num_predictors: int | None = None
    predictor_cpus: float | None = None
    device: str = "auto"
    decode: str = "auto"
    compile: bool = False
    predictor_concurrency: int | None = None
    ray_address: str | None = None
    force: bool = False
    max_error_fraction: float = 0.01
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    # Failure tests only (pipeline.faults): deliberate process deaths.
    faults: str = ""

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {self.decode!r}")
        for name in ("batch_size", "read_batch_rows", "files_per_shard", "max_pixels",
                     "predictor_concurrency"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_predictors is not None and self.num_predictors < 1:
            raise ValueError(f"num_predictors must be >= 1, got {self.num_predictors}")
        if not 0 <= self.margin <= 2:
            raise ValueError(f"margin must be between 0 and 2, got {self.margin}")
        if not 0 <= self.max_error_fraction <= 1:
            raise ValueError(f"max_error_fraction must be between 0 and 1, got "
                             f"{self.max_error_fraction}")

    def result_settings(self) -> dict[str, Any]:
        """The settings besides input and model that change the output rows (for resume)."""
        return {"format": self.format, "image_column": self.image_column,
                "key_column": self.key_column, "files_per_shard": self.files_per_shard,
                "margin": self.margin, "max_pixels": self.max_pixels}

    def public_dict(self) -> dict[str, Any]:
        """The config without secrets: storage option values are left out."""
        data = asdict(self)
        data["storage_options"] = sorted(self.storage_options)
        data.pop("faults")
        return data


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at ``address`` / ``RAY_ADDRESS`` or start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    log.info("connecting to Ray at %s", address) if address else log.info("starting local Ray")
    ray.init(address=address)


def _read_task_options() -> dict[str, Any]:
    return {"max_retries": READ_TASK_RETRIES}


def _read_shards(batch: dict[str, np.ndarray], **reader_kwargs):
    yield from ShardReader(**reader_kwargs)(batch)


class _ShardCollector:
    """Gather predictor rows per shard on the driver; hand back a shard once it is complete."""

    def __init__(self):
        self.parts: dict[str, list[dict[str, np.ndarray]]] = {}
        self.received: dict[str, int] = {}
        self.expected: dict[str, int] = {}
        self.seen: dict[str, set[int]] = {}

    def add(self, batch: dict[str, np.ndarray]) -> list[tuple[str, dict[str, np.ndarray]]]:
        done = []
        names = np.asarray(batch["shard_name"]).astype(str)
        for name in np.unique(names):
            rows = names == name
            part = {k: np.asarray(v)[rows] for k, v in batch.items()}
            # A retried task may deliver rows again: keep each position of a shard once.
            seen = self.seen.setdefault(name, set())
            fresh = np.asarray([int(q) not in seen for q in part["seq"]], dtype=bool)
            if not fresh.all():
                part = {k: v[fresh] for k, v in part.items()}
            seen.update(int(q) for q in part["seq"])
            self.parts.setdefault(name, []).append(part)
            self.received[name] = len(seen)
            if part["last"].any():
                self.expected[name] = int(part["seq"][part["last"]].max()) + 1
            if self.received[name] == self.expected.get(name):
                parts = self.parts.pop(name)
                self.seen.pop(name)
                merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                order = np.argsort(merged["seq"], kind="stable")
                done.append((name, {k: v[order] for k, v in merged.items()}))
        return done

    def unfinished(self) -> list[str]:
        return sorted(self.parts)


def run_inference(cfg: InferConfig, job_config: Mapping[str, Any] | None = None) -> Summary:
    """Run the whole job and return its summary; output files are committed shard by shard.

    Shards completed by an earlier run with the same model and settings are skipped unless
    ``cfg.force``. ``job_config`` (the resolved command-line config) is saved as
    ``OUTPUT/_config.yaml`` once the input is listed and the model loads, so a job that fails
    its checks leaves nothing behind."""
    started = time.time()
    start_iso = datetime.now(timezone.utc).isoformat(timespec="seconds")
    output = cfg.output.rstrip("/")
    shards = list_shards(cfg.input, cfg.format, cfg.storage_options, cfg.files_per_shard)
    log.info("found %d %s shard(s) under %s", len(shards), shards[0].format, cfg.input)
    # Load once on the driver: a bad weights URI fails here, before any cluster work.
    _, model_info = load_model(cfg.weights, cfg.init, cfg.storage_options, cfg.seed)
    log.info("model %s from %s", model_info.version, model_info.source)
    settings = settings_id(cfg.result_settings())

    remove_stale_temporary_files(output)
    if job_config is not None:
        from pipeline.config import save_config

        save_config(job_config, f"{output}/{CONFIG_FILE}", cfg.storage_options)
        log.info("resolved config saved to %s/%s (reuse it with --config)", output, CONFIG_FILE)
    done = {} if cfg.force else completed_shards(output, shards, model_info.version, settings,
                                                 cfg.storage_options)
    todo = [s for s in shards if s.name not in done]
    if done:
        log.info("%d shard(s) already done for model %s with these settings: skipped "
                 "(--force redoes them); %d to do", len(done), model_info.version, len(todo))

    by_name = {s.name: s for s in shards}
    summary = Summary(len(shards), 0, 0, 0.0, model_info.version, output, [],
                      skipped_shards=len(done), max_error_fraction=cfg.max_error_fraction,
                      skipped_rows=sum(r["rows"] for r in done.values()),
                      skipped_errors=sum(r["errors"] for r in done.values()))
    per_shard: dict[str, dict[str, int]] = {}

    def commit(name: str, rows: dict[str, np.ndarray]) -> None:
        uri = f"{output}/{output_file_name(name)}"
        table = rows_to_table(rows)
        kinds = [k for k in table.column("error_kind").to_pylist() if k]
        shard_failed = any(not key and kind in SHARD_FAILURE_KINDS
                           for key, kind in zip(rows["key"], rows["error_kind"], strict=True))
        write_table_atomic(table, uri, cfg.storage_options)
        # The record that says the shard is done goes last, after its data is committed.
        write_completion_record(output, by_name[name], table.num_rows, len(kinds), shard_failed,
                                model_info.version, settings, cfg.storage_options)
        summary.files.append(uri)
        summary.samples += table.num_rows
        summary.errors += len(kinds)
        for kind in kinds:
            summary.errors_by_kind[kind] = summary.errors_by_kind.get(kind, 0) + 1
        if shard_failed:
            summary.failed_shards.append(name)
        per_shard[name] = {"rows": table.num_rows, "errors": len(kinds)}
        elapsed = time.time() - started
        log.info("[%d/%d shards] %s: %d rows, %d errors | %d samples, %.1f images/s",
                 len(per_shard), len(todo), output_file_name(name), table.num_rows, len(kinds),
                 summary.samples, (summary.samples - summary.errors) / max(elapsed, 1e-9))

    if todo:
        collector = _ShardCollector()
        last_log = time.time()
        for batch in _dataset(cfg, todo).iter_batches(batch_size=None, batch_format="numpy"):
            for name, rows in collector.add(batch):
                commit(name, rows)
            if time.time() - last_log > 30:
                last_log = time.time()
                log.info("... %d rows in, %d/%d shards committed", summary.samples + sum(
                    collector.received.get(n, 0) for n in collector.parts), len(per_shard),
                    len(todo))
        if collector.unfinished():
            raise RuntimeError(f"rows missing for shard(s) {collector.unfinished()}: their "
                               "output was not written; rerun the job to redo them")
        for shard in todo:  # shards without a single row (an empty tar) still get their file
            if shard.name not in per_shard:
                commit(shard.name, _no_rows())

    summary.seconds = time.time() - started
    summary.files.sort()
    write_manifest(cfg.public_dict(), summary, per_shard, done, start_iso,
                   cfg.storage_options)
    return summary


@dataclass(frozen=True)
class Plan:
    """How the dataset runs on this cluster: the choices the ``auto`` settings resolve to."""

    use_gpu: bool
    decode: str
    batch_size: int
    pool_size: int
    actor_cpus: float
    concurrency: int


def plan(cfg: InferConfig, cluster_cpus: int, cluster_gpus: int) -> Plan:
    """Resolve device, decode mode, batch size, actor pool and concurrency for a cluster."""
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and cluster_gpus > 0)
    if use_gpu and cluster_gpus == 0:
        raise ValueError("--device cuda was asked for but the Ray cluster has no GPUs")
    decode = cfg.decode
    if decode == "auto":
        # One GPU outruns ~50 cores of PIL decoding; below that the GPU decodes (nvJPEG).
        fast_enough = cluster_cpus * CPU_DECODE_IMAGES_PER_S >= max(
            cluster_gpus, 1) * GPU_MODEL_IMAGES_PER_S
        decode = "gpu" if use_gpu and not fast_enough else "cpu"
    key = ("cuda+compile" if cfg.compile else "cuda") if use_gpu else "cpu"
    return Plan(
        use_gpu=use_gpu,
        decode=decode,
        batch_size=cfg.batch_size or DEFAULT_BATCH_SIZE[key],
        pool_size=cfg.num_predictors or (cluster_gpus if use_gpu else 1),
        # CPU inference: one actor with all but one core (the other reads and decodes); GPU:
        # 1 CPU per actor (its host work: batching, copies, and the CPU decode fallback).
        actor_cpus=cfg.predictor_cpus or (1 if use_gpu else max(1, cluster_cpus - 1)),
        # GPU: two calls at once per actor, so one batch's host work and copy overlap the
        # other's GPU work (each thread has its own CUDA streams); CPU: one (it owns the cores).
        concurrency=cfg.predictor_concurrency or (2 if use_gpu else 1),
    )


def _actor_pool(size: int, concurrency: int, ray_remote_args: dict[str, Any]):
    """``ActorPoolStrategy`` running ``concurrency`` calls at once per actor, on any Ray 2.5x."""
    import inspect

    import ray

    params = inspect.signature(ray.data.ActorPoolStrategy).parameters
    if concurrency > 1 and "enable_true_multi_threading" in params:
        return ray.data.ActorPoolStrategy(
            size=size, max_tasks_in_flight_per_actor=max(2, concurrency),
            max_concurrent_calls_per_actor=concurrency, enable_true_multi_threading=True)
    if concurrency > 1:  # older Ray Data: a threaded actor does the same
        ray_remote_args["max_concurrency"] = concurrency
    return ray.data.ActorPoolStrategy(size=size)


def _dataset(cfg: InferConfig, shards: list[Shard]):
    """The Ray Data pipeline: one read task per shard, then the predictor actor pool."""
    import ray

    ensure_ray(cfg.ray_address)
    resources = ray.cluster_resources()
    p = plan(cfg, int(resources.get("CPU", 1)), int(resources.get("GPU", 0)))
    log.info("predictors: %d %s actor(s), batch size %d, %g CPU each, %d call(s) at once; "
             "decoding on the %s%s", p.pool_size, "GPU" if p.use_gpu else "CPU",
             p.batch_size, p.actor_cpus, p.concurrency, "GPU" if p.decode == "gpu" else "CPU",
             ", model compiled" if cfg.compile else "")
    if p.decode == "gpu" and not p.use_gpu:
        log.info("--decode gpu without GPUs: the CPU predictor actor decodes (torchvision)")

    items = [{"shard": encode_shard(s)} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _read_shards,
        batch_size=1,
        num_cpus=1,
        # Task retries for read tasks whose worker dies. Given as a function because Ray Data
        # never fuses a stage that has one into the next: reading must not move into the
        # predictor actors (that would decode every shard inside the few predictor processes).
        ray_remote_args_fn=_read_task_options,
        fn_kwargs=dict(
            storage_options=dict(cfg.storage_options), margin=cfg.margin,
            max_pixels=cfg.max_pixels, image_column=cfg.image_column,
            key_column=cfg.key_column, rows_per_batch=cfg.read_batch_rows, faults=cfg.faults,
            decode=p.decode,
        ),
    )
    # A predictor process that dies is restarted, and its batch retried, by Ray.
    remote_args: dict[str, Any] = {"max_restarts": ACTOR_RESTARTS,
                                   "max_task_retries": ACTOR_RESTARTS}
    compute = _actor_pool(p.pool_size, p.concurrency, remote_args)
    return ds.map_batches(
        LandmarkPredictor,
        fn_constructor_kwargs=dict(
            weights=cfg.weights, init=cfg.init, seed=cfg.seed,
            storage_options=dict(cfg.storage_options), device="cuda" if p.use_gpu else "cpu",
            # The core left to the read tasks is mostly idle on CPU (decoding is ~100x cheaper
            # than the CPU forward pass), so the model threads use it too: 2 threads run the
            # forward pass ~1.9x faster than 1 on a 2-core machine.
            num_threads=None if p.use_gpu else int(p.actor_cpus) + 1, faults=cfg.faults,
            micro_batch=p.batch_size, compile=cfg.compile, max_pixels=cfg.max_pixels,
        ),
        batch_size=p.batch_size,
        compute=compute,
        num_gpus=1 if p.use_gpu else 0,
        num_cpus=p.actor_cpus,
        **remote_args,
    )


def _no_rows() -> dict[str, np.ndarray]:
    rows = empty_rows(0)
    rows.pop("pixels")
    rows["landmarks"] = np.zeros((0, 68, 2), np.float32)
    rows["model_version"] = np.empty(0, dtype=object)
    return rows
