"""The inference job: shards -> Ray Data (read+preprocess tasks, predictor actor pool) -> Parquet.

The only module of the inference path that imports Ray. The driver lists the shards once, runs
the dataset, and commits each shard's output file as soon as all of that shard's rows are in
(every row carries its position ``seq`` and the shard's final row is flagged ``last``), so output
appears while the job runs and a shard's file is never written twice in one run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from pipeline.model import load_model
from pipeline.output import (
    output_file_name,
    rows_to_table,
    write_completion_record,
    write_table_atomic,
)
from pipeline.preprocess import DEFAULT_MARGIN, DEFAULT_MAX_PIXELS
from pipeline.shards import Shard, list_shards
from pipeline.stages import LandmarkPredictor, ShardReader, empty_rows, encode_shard
from pipeline.storage import write_bytes

log = logging.getLogger("pipeline")

DEVICES = ("auto", "cuda", "cpu")
READ_TASK_RETRIES = 3


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
    batch_size: int = 64
    read_batch_rows: int = 32
    num_predictors: int | None = None
    predictor_cpus: float | None = None
    device: str = "auto"
    ray_address: str | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        for name in ("batch_size", "read_batch_rows", "files_per_shard", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_predictors is not None and self.num_predictors < 1:
            raise ValueError(f"num_predictors must be >= 1, got {self.num_predictors}")
        if not 0 <= self.margin <= 2:
            raise ValueError(f"margin must be between 0 and 2, got {self.margin}")

    def public_dict(self) -> dict[str, Any]:
        """The config without secrets: storage option values are left out."""
        data = asdict(self)
        data["storage_options"] = sorted(self.storage_options)
        return data


@dataclass
class Summary:
    shards: int
    samples: int
    errors: int
    seconds: float
    model_version: str
    output: str
    files: list[str]

    @property
    def images_per_s(self) -> float:
        return (self.samples - self.errors) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.samples} samples in {self.shards} shards, {self.errors} errors, "
                f"{self.seconds:.1f} s, {self.images_per_s:.1f} images/s "
                f"(model {self.model_version}) -> {self.output}")


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

    def add(self, batch: dict[str, np.ndarray]) -> list[tuple[str, dict[str, np.ndarray]]]:
        done = []
        names = np.asarray(batch["shard_name"]).astype(str)
        for name in np.unique(names):
            rows = names == name
            part = {k: np.asarray(v)[rows] for k, v in batch.items()}
            self.parts.setdefault(name, []).append(part)
            self.received[name] = self.received.get(name, 0) + int(rows.sum())
            if part["last"].any():
                self.expected[name] = int(part["seq"][part["last"]].max()) + 1
            if self.received[name] == self.expected.get(name):
                parts = self.parts.pop(name)
                merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                order = np.argsort(merged["seq"], kind="stable")
                done.append((name, {k: v[order] for k, v in merged.items()}))
        return done

    def unfinished(self) -> list[str]:
        return sorted(self.parts)


def run_inference(cfg: InferConfig) -> Summary:
    """Run the whole job and return its summary; output files are committed shard by shard."""
    import ray

    started = time.time()
    start_iso = datetime.now(timezone.utc).isoformat(timespec="seconds")
    shards = list_shards(cfg.input, cfg.format, cfg.storage_options, cfg.files_per_shard)
    log.info("found %d %s shard(s) under %s", len(shards), shards[0].format, cfg.input)
    # Load once on the driver: a bad weights URI fails here, before any cluster work.
    _, model_info = load_model(cfg.weights, cfg.init, cfg.storage_options, cfg.seed)
    log.info("model %s from %s", model_info.version, model_info.source)

    ensure_ray(cfg.ray_address)
    resources = ray.cluster_resources()
    cluster_gpus, cluster_cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and cluster_gpus > 0)
    if use_gpu and cluster_gpus == 0:
        raise ValueError("--device cuda was asked for but the Ray cluster has no GPUs")
    pool_size = cfg.num_predictors or (cluster_gpus if use_gpu else 1)
    # CPU inference: one actor with all but one core (the other decodes); GPU: 1 CPU per actor.
    actor_cpus = cfg.predictor_cpus or (1 if use_gpu else max(1, cluster_cpus - 1))
    log.info("predictors: %d %s actor(s), batch size %d, %g CPU each", pool_size,
             "GPU" if use_gpu else "CPU", cfg.batch_size, actor_cpus)

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
            key_column=cfg.key_column, rows_per_batch=cfg.read_batch_rows,
        ),
    )
    ds = ds.map_batches(
        LandmarkPredictor,
        fn_constructor_kwargs=dict(
            weights=cfg.weights, init=cfg.init, seed=cfg.seed,
            storage_options=dict(cfg.storage_options), device="cuda" if use_gpu else "cpu",
            # The core left to the read tasks is mostly idle on CPU (decoding is ~100x cheaper
            # than the CPU forward pass), so the model threads use it too: 2 threads run the
            # forward pass ~1.9x faster than 1 on a 2-core machine.
            num_threads=None if use_gpu else int(actor_cpus) + 1,
        ),
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=pool_size),
        num_gpus=1 if use_gpu else 0,
        num_cpus=actor_cpus,
    )

    output = cfg.output.rstrip("/")
    collector = _ShardCollector()
    samples = errors = 0
    files: list[str] = []
    last_log = time.time()

    by_name = {s.name: s for s in shards}

    def commit(name: str, rows: dict[str, np.ndarray]) -> None:
        nonlocal samples, errors
        uri = f"{output}/{output_file_name(name)}"
        table = rows_to_table(rows)
        shard_errors = table.num_rows - table.column("error").null_count
        write_table_atomic(table, uri, cfg.storage_options)
        # The record that says the shard is done goes last, after its data is committed.
        write_completion_record(output, by_name[name], table.num_rows, shard_errors,
                                model_info.version, cfg.storage_options)
        files.append(uri)
        samples += table.num_rows
        errors += shard_errors
        elapsed = time.time() - started
        log.info("[%d/%d shards] %s: %d rows, %d errors | %d samples, %.1f images/s",
                 len(files), len(shards), output_file_name(name), table.num_rows, shard_errors,
                 samples, (samples - errors) / max(elapsed, 1e-9))

    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for name, rows in collector.add(batch):
            commit(name, rows)
        if time.time() - last_log > 30:
            last_log = time.time()
            log.info("... %d rows in, %d/%d shards committed", samples + sum(
                collector.received.get(n, 0) for n in collector.parts), len(files), len(shards))

    if collector.unfinished():
        raise RuntimeError(f"rows missing for shard(s) {collector.unfinished()}: output for them "
                           "was not written; rerun the job")
    written = {f.rsplit("/", 1)[1] for f in files}
    for shard in shards:  # shards without a single row (an empty tar) still get their file
        if output_file_name(shard.name) not in written:
            commit(shard.name, _no_rows())

    summary = Summary(len(shards), samples, errors, time.time() - started,
                      model_info.version, output, sorted(files))
    _write_manifest(cfg, summary, shards, start_iso)
    return summary


def _no_rows() -> dict[str, np.ndarray]:
    rows = empty_rows(0)
    rows.pop("pixels")
    rows["landmarks"] = np.zeros((0, 68, 2), np.float32)
    rows["model_version"] = np.empty(0, dtype=object)
    return rows


def _write_manifest(cfg: InferConfig, summary: Summary, shards: list[Shard], start: str) -> None:
    manifest = {
        "config": cfg.public_dict(),
        "model_version": summary.model_version,
        "started": start,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shards": len(shards),
        "samples": summary.samples,
        "errors": summary.errors,
        "seconds": round(summary.seconds, 3),
        "images_per_s": round(summary.images_per_s, 3),
        "files": summary.files,
    }
    write_bytes(f"{summary.output}/_manifest.json", json.dumps(manifest, indent=2).encode(),
                cfg.storage_options)
