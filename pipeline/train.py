"""The fine-tuning job: labelled shards -> Ray Data -> Ray Train ``TorchTrainer`` -> model file.

The only module of the training path that imports Ray, and only inside functions. The driver lists
the shards, builds two Ray Data pipelines of ``pipeline.labels.LabelledReader`` tasks (training:
context crops, split across workers; validation: the inference job's exact 224x224 crops, read by
every worker, each scoring the rows whose key hash falls to it) and runs ``TorchTrainer``. Every
epoch each worker trains on its shard of the data with on-device augmentation, the validation sums
are all-reduced, and rank 0 reports a checkpoint; Ray keeps the best ``keep_best`` by validation NME
(plus the latest) under ``storage_path/name``. Rerunning with the same storage path and name resumes
from the latest checkpoint (Ray Train V2 restores its run snapshot from there), and
``FailureConfig(max_failures)`` restarts a failed worker group from it. At the end the best
checkpoint is exported as a model file that ``pipeline.model.load_model`` reads.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pipeline.metrics import DEFAULT_THRESHOLD
from pipeline.preprocess import DEFAULT_MARGIN, DEFAULT_MAX_PIXELS

log = logging.getLogger("pipeline")

DEVICES = ("auto", "cuda", "cpu")
READ_TASK_RETRIES = 3
# pyarrow reads these natively; Ray Train then needs no fsspec wrapper for them.
NATIVE_PROTOCOLS = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything the fine-tuning job needs; built by ``pipeline.train_cli``."""

    input: str
    storage_path: str
    name: str
    val_input: str | None = None
    val_fraction: float = 0.05
    export: str | None = None  # default: <storage_path>/<name>/model.pt
    format: str = "auto"
    image_column: str = "image"
    key_column: str = "key"
    margin: float = DEFAULT_MARGIN
    max_pixels: int = DEFAULT_MAX_PIXELS
    context: float = 1.5  # training crops read this much larger, so warps see real image
    weights: str | None = None
    init: str = "imagenet"
    seed: int = 0
    epochs: int = 10
    batch_size: int = 32  # per worker
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    freeze_features: bool = False
    loss: str = "wing"
    lr_schedule: str = "cosine"
    augment: dict[str, float] = field(default_factory=dict)  # AugmentConfig fields
    num_workers: int = 1
    device: str = "auto"
    cpus_per_worker: float = 1.0
    threads_per_worker: int | None = None
    reader_cpus: float = 1.0
    shuffle_buffer: int = 256
    cache: bool = False  # keep decoded crops in the object store: no re-decoding every epoch
    keep_best: int = 3
    max_failures: int = 2
    threshold: float = DEFAULT_THRESHOLD
    fail_at_step: int | None = None  # testing: rank 0 raises once when it reaches this step
    ray_address: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from pipeline.augment import AugmentConfig
        from pipeline.model import INIT_CHOICES
        from pipeline.train_loop import LOSSES, SCHEDULES

        choices = {"loss": LOSSES, "lr_schedule": SCHEDULES, "device": DEVICES,
                   "init": INIT_CHOICES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "num_workers", "keep_best", "shuffle_buffer"):
            if getattr(self, name) < (0 if name == "shuffle_buffer" else 1):
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.val_input and not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction must be in (0, 1) without val_input, got "
                             f"{self.val_fraction}")
        if self.lr <= 0 or self.backbone_lr_mult < 0 or self.context < 1:
            raise ValueError("need lr > 0, backbone_lr_mult >= 0 and context >= 1")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty folder name, got {self.name!r}")
        AugmentConfig(**self.augment)  # raises ValueError on a bad range

    def public_dict(self) -> dict[str, Any]:
        """The config without secrets: storage option values are left out."""
        data = asdict(self)
        data["storage_options"] = sorted(self.storage_options)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class FinetuneSummary:
    run_dir: str
    export: str
    model_version: str
    best: dict[str, Any]
    history: list[dict[str, Any]]
    last: dict[str, Any]  # what the final report said, including where it resumed from


def resolve_storage(uri: str, storage_options: dict[str, Any] | None = None):
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig`` from any fsspec URI.

    Local paths become absolute; ``s3://``, ``gs://`` ... without options go to Ray as they are
    (pyarrow's own filesystems); anything else, or any URI with storage options (an S3 endpoint,
    credentials), goes through fsspec wrapped as a pyarrow filesystem.
    """
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol in ("file", "local"):
        return os.path.abspath(uri.split("://", 1)[-1]), None
    if protocol in NATIVE_PROTOCOLS and not storage_options:
        return uri, None
    from fsspec.core import url_to_fs
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = url_to_fs(uri, **dict(storage_options or {}))
    return path, PyFileSystem(FSSpecHandler(fs))


def run_dir_uri(cfg: FinetuneConfig) -> str:
    """Where the run's checkpoints, model file and summary live, as an fsspec URI."""
    return f"{cfg.storage_path.rstrip('/')}/{cfg.name}"


def main(cfg: FinetuneConfig) -> FinetuneSummary:
    """Train (or resume), then export the best checkpoint; returns what was written."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.inference import ensure_ray
    from pipeline.shards import list_shards

    train_shards = list_shards(cfg.input, cfg.format, cfg.storage_options)
    val_shards = (list_shards(cfg.val_input, cfg.format, cfg.storage_options)
                  if cfg.val_input else train_shards)
    ensure_ray(cfg.ray_address)
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and cluster_gpus > 0)
    if use_gpu and cluster_gpus == 0:
        raise ValueError("--device cuda was asked for but the Ray cluster has no GPUs")
    split = "all" if cfg.val_input else "train"
    datasets = {
        "train": _dataset(cfg, train_shards, split, cfg.context).randomize_block_order(),
        "val": _dataset(cfg, val_shards, "all" if cfg.val_input else "val", 1.0),
    }
    storage_path, filesystem = resolve_storage(cfg.storage_path, cfg.storage_options)
    log.info("fine-tuning %s: %d train shard(s), %d %s worker(s), checkpoints in %s",
             cfg.name, len(train_shards), cfg.num_workers, "GPU" if use_gpu else "CPU",
             run_dir_uri(cfg))
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=asdict(cfg),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_best,
                                               checkpoint_score_attribute="val_nme",
                                               checkpoint_score_order="min"),
        ),
        datasets=datasets,
        # Only training rows are split; every worker reads the validation set whole.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    return export_best(cfg, result)


def _dataset(cfg: FinetuneConfig, shards, split: str, context: float):
    import ray

    from pipeline.stages import encode_shard

    items = [{"shard": encode_shard(s)} for s in shards]
    reader = dict(split=split, val_fraction=cfg.val_fraction, context=context, margin=cfg.margin,
                  max_pixels=cfg.max_pixels, storage_options=dict(cfg.storage_options),
                  image_column=cfg.image_column, key_column=cfg.key_column)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_read_labelled, batch_size=1, num_cpus=cfg.reader_cpus,
                        ray_remote_args_fn=_read_task_options, fn_kwargs=reader)
    ds = ds.drop_columns(["key", "crop"])  # strings cannot become tensors
    # Augmentation happens on the workers, so cached crops still give new samples every epoch.
    return ds.materialize() if cfg.cache else ds


def _read_task_options() -> dict[str, Any]:
    return {"max_retries": READ_TASK_RETRIES}  # a lost read task is retried, not the job


def _read_labelled(batch, **reader_kwargs):
    from pipeline.labels import LabelledReader

    yield from LabelledReader(**reader_kwargs)(batch)


def _train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: restore, train epochs, validate, report checkpoints."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from pipeline import train_loop as tl
    from pipeline.augment import AugmentConfig
    from pipeline.model import load_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = FinetuneConfig.from_dict(config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker)))
    model, info = load_model(cfg.weights, cfg.init, cfg.storage_options, cfg.seed)
    state, payload = tl.TrainState(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            payload = tl.load_state(directory)
        model.load_state_dict(payload["model"])
        state = tl.TrainState(**payload["state"])
    tl.freeze_features(model, cfg.freeze_features)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model)
    optimizer = tl.build_optimizer(model, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
    scheduler = tl.build_scheduler(optimizer, cfg.lr_schedule, cfg.epochs)
    restored = {"restored_step": -1, "restored_optimizer": ""}
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])  # moves the moments to the device
        scheduler.load_state_dict(payload["scheduler"])
        restored = {"restored_step": state.step,
                    "restored_optimizer": tl.optimizer_digest(optimizer.state_dict())}
        if rank == 0:
            log.info("resumed from epoch %d, step %d", state.epoch, state.step)

    def after_step(step: int) -> None:
        if step == cfg.fail_at_step and rank == 0:
            _inject_fault_once(cfg, step)

    augment = AugmentConfig(**cfg.augment)
    train_data = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    for epoch in range(state.epoch, cfg.epochs):
        started = time.time()
        batches = train_data.iter_torch_batches(
            batch_size=cfg.batch_size, local_shuffle_buffer_size=cfg.shuffle_buffer or None)
        loss_sum, images, steps = tl.train_epoch(
            ddp_model, batches, optimizer, augment=augment, context=cfg.context,
            loss_kind=cfg.loss, device=device, seed=cfg.seed, rank=rank, first_step=state.step,
            after_step=after_step)
        if steps == 0:
            raise ValueError(f"worker {rank} got no training rows: the training split has fewer "
                             f"rows than the {world} workers")
        seconds = time.time() - started
        totals = torch.tensor([loss_sum, steps, images], dtype=torch.float64, device=device)
        slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        scheduler.step()
        state.step += steps
        sums = tl.validate(model, val_data.iter_torch_batches(batch_size=cfg.batch_size),
                           device=device, rank=rank, world=world, threshold=cfg.threshold)
        dist.all_reduce(sums)
        metrics = {"epoch": epoch + 1, "step": state.step,
                   "train_loss": float(totals[0] / totals[1]),
                   "train_images": int(totals[2]), "train_seconds": float(slowest[0]),
                   "images_per_s": float(totals[2] / slowest[0]),
                   **tl.validation_metrics(sums, cfg.threshold), **restored}
        state.epoch = epoch + 1
        state.best_nme = min(state.best_nme, metrics["val_nme"])
        state.history.append(metrics)
        if rank == 0:
            log.info("epoch %d/%d step %d: train loss %.4f | val NME %.2f %% (failure %.1f %%) "
                     "| %.1f images/s", epoch + 1, cfg.epochs, state.step, metrics["train_loss"],
                     100 * metrics["val_nme"], 100 * metrics[f"val_failure_rate@{cfg.threshold:g}"],
                     metrics["images_per_s"])
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:  # one copy of the DDP-synchronised state is enough
                tl.save_state(directory, model, optimizer, scheduler, state)
                saved = ray.train.Checkpoint.from_directory(directory)
            name = f"epoch-{epoch + 1:04d}"
            ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=name)
    return {"epoch": state.epoch, "step": state.step, "model_version": info.version}


def _inject_fault_once(cfg: FinetuneConfig, step: int) -> None:
    """Fail like a lost worker, once per run and step: a marker in the run folder remembers it,
    so the attempt that restarts from the checkpoint gets past this step."""
    from fsspec.core import url_to_fs

    fs, marker = url_to_fs(f"{run_dir_uri(cfg)}/_fault-injected-at-step-{step}",
                           **cfg.storage_options)
    if not fs.exists(marker):
        fs.pipe_file(marker, b"")
        raise RuntimeError(f"fault injected at step {step} (fail_at_step, for testing)")


def export_best(cfg: FinetuneConfig, result) -> FinetuneSummary:
    """Write the best checkpoint (lowest ``val_nme``) as a model file and the run summary."""
    import fsspec

    from pipeline.model import build_model, save_model
    from pipeline.train_loop import PROGRESS_FILE, load_state

    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if "val_nme" in m]
    if not candidates:
        raise RuntimeError(f"run {cfg.name} reported no checkpoint: nothing to export")
    best_checkpoint, best = min(candidates, key=lambda cm: cm[1]["val_nme"])
    with best_checkpoint.as_directory() as directory:
        payload = load_state(directory)
    model = build_model()
    model.load_state_dict(payload["model"])
    export = cfg.export or f"{run_dir_uri(cfg)}/model.pt"
    latest = result.checkpoint or best_checkpoint
    with latest.filesystem.open_input_stream(f"{latest.path}/{PROGRESS_FILE}") as f:
        history = json.loads(f.read())["history"]
    metadata = {"run": cfg.name, "checkpoint": best_checkpoint.path, "best": best,
                "init": cfg.weights or cfg.init, "config": cfg.public_dict()}
    version = save_model(model, export, metadata=metadata, storage_options=cfg.storage_options)
    summary = FinetuneSummary(run_dir_uri(cfg), export, version, best, history,
                              dict(result.metrics or {}))
    with fsspec.open(f"{run_dir_uri(cfg)}/finetune.json", "w", **cfg.storage_options) as f:
        json.dump({**asdict(summary), "config": cfg.public_dict()}, f, indent=2)
    log.info("exported the best checkpoint (epoch %d, val NME %.2f %%) to %s, version %s",
             best["epoch"], 100 * best["val_nme"], export, version)
    return summary
