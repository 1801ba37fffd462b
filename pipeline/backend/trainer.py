"""The fine-tuning job: labelled shards -> Ray Data -> Ray Train ``TorchTrainer`` -> model file.

The training half of ``pipeline.backend``; Ray is imported inside functions only. The driver lists
the shards, builds two Ray Data pipelines of ``pipeline.stages.labels.LabelledReader`` tasks
(training: context crops, split across workers; validation: the inference job's exact 224x224 crops,
read by every worker, each scoring the rows whose key hash falls to it) and runs ``TorchTrainer``.
Every epoch each worker trains on its shard of the data with on-device augmentation, the validation
sums are all-reduced, and rank 0 reports a checkpoint; Ray keeps the best ``keep_best`` by
validation NME (plus the latest) under ``storage_path/name``. Rerunning with the same storage path
and name resumes from the latest checkpoint (Ray Train V2 restores its run snapshot from there), and
``FailureConfig(max_failures)`` restarts a failed worker group from it. At the end the best
checkpoint is exported as a model file that ``pipeline.model.network.load_model`` reads.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, replace
from typing import Any

from pipeline.config.errors import BadInput
from pipeline.stages.faults import FaultPlan, plan_from_env
from pipeline.training.config import (
    AugmentConfig,
    FinetuneConfig,
    FinetuneSummary,
    resolve_storage,
    run_dir_uri,
)

log = logging.getLogger("pipeline")


def main(cfg: FinetuneConfig) -> FinetuneSummary:
    """Train (or resume), then export the best checkpoint; returns what was written."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.backend.cluster import cluster_resources, ensure_ray, wants_gpu
    from pipeline.io.shards import list_shards

    train_shards = list_shards(cfg.input, cfg.format, cfg.storage_options)
    val_shards = (
        list_shards(cfg.val_input, cfg.format, cfg.storage_options)
        if cfg.val_input
        else train_shards
    )
    ensure_ray(cfg.ray_address)
    use_gpu = wants_gpu(cfg.device, cluster_resources()[1])
    split = "all" if cfg.val_input else "train"
    datasets = {
        "train": _dataset(cfg, train_shards, split, cfg.context).randomize_block_order(),
        "val": _dataset(cfg, val_shards, "all" if cfg.val_input else "val", 1.0),
    }
    storage_path, filesystem = resolve_storage(cfg.storage_path, cfg.storage_options)
    log.info(
        "fine-tuning %s: %d train shard(s), %d %s worker(s), checkpoints in %s",
        cfg.name,
        len(train_shards),
        cfg.num_workers,
        "GPU" if use_gpu else "CPU",
        run_dir_uri(cfg),
    )
    trainer = TorchTrainer(
        _train_loop_per_worker,
        # Ray records train_loop_config in its run state: the storage options' values travel
        # in the object store instead (a reference here), like every other task argument.
        train_loop_config={"config": {**asdict(cfg), "storage_options": {}},
                           "storage_options": ray.put(dict(cfg.storage_options)),
                           "faults": plan_from_env()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_best,
                checkpoint_score_attribute="val_nme",
                checkpoint_score_order="min",
            ),
        ),
        datasets=datasets,
        # Only training rows are split; every worker reads the validation set whole.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    return export_best(cfg, result)


def _dataset(cfg: FinetuneConfig, shards, split: str, context: float):
    import ray

    from pipeline.stages.reader import encode_shard

    items = [{"shard": encode_shard(s)} for s in shards]
    same = ("val_fraction", "margin", "max_pixels", "storage_options", "image_column", "key_column")
    reader = {"split": split, "context": context, **{k: getattr(cfg, k) for k in same}}
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _read_labelled,
        batch_size=1,
        num_cpus=cfg.reader_cpus,
        fn_kwargs=reader,
    )
    ds = ds.drop_columns(["key", "crop"])  # strings cannot become tensors
    # Augmentation happens on the workers, so cached crops still give new samples every epoch.
    return ds.materialize() if cfg.cache else ds


def _read_labelled(batch, **reader_kwargs):
    from pipeline.stages.labels import LabelledReader

    yield from LabelledReader(**reader_kwargs)(batch)


def _train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: restore, train epochs, validate, report checkpoints."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from pipeline.model.network import load_model
    from pipeline.model.precision import channels_last, resolve_precision, use_ieee_fp32
    from pipeline.training import loop as tl

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = replace(FinetuneConfig.from_dict(config["config"]),
                  storage_options=ray.get(config["storage_options"]))
    faults = FaultPlan(config["faults"])  # failure tests only (pipeline.stages.faults)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg.precision, device)
    use_ieee_fp32()  # fp32 means fp32 (no TF32): pipeline.model.precision
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker)))
    else:
        # Fixed 224x224 training shapes: pick the fastest kernels (validation turns it off:
        # its batch sizes vary).
        torch.backends.cudnn.benchmark = True
    model, info = load_model(cfg.weights, cfg.init, cfg.storage_options, cfg.seed)
    state, payload = tl.TrainState(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            payload = tl.load_state(directory)
        model.load_state_dict(payload["model"])
        state = tl.TrainState(**payload["state"])
    tl.freeze_features(model, cfg.freeze_features)
    if channels_last(device, precision):
        model = model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model)
    optimizer = tl.build_optimizer(model, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
    scheduler = tl.build_scheduler(optimizer, cfg.lr_schedule, cfg.epochs)
    restored = {"restored_step": -1, "restored_optimizer": ""}
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])  # moves the moments to the device
        scheduler.load_state_dict(payload["scheduler"])
        restored = {
            "restored_step": state.step,
            "restored_optimizer": tl.optimizer_digest(optimizer.state_dict()),
        }
        payload = None  # a second copy of weights and moments: let it go
        if rank == 0:
            log.info("resumed from epoch %d, step %d", state.epoch, state.step)

    def after_step(step: int) -> None:
        if rank == 0:
            faults.at_step(step)

    augment = AugmentConfig(**cfg.augment)
    train_data = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    for epoch in range(state.epoch, cfg.epochs):
        started = time.time()
        batches = train_data.iter_torch_batches(
            batch_size=cfg.batch_size,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            prefetch_batches=2,  # keep a batch in flight while the device computes
        )
        loss_sum, images, steps = tl.train_epoch(
            ddp_model,
            batches,
            optimizer,
            augment=augment,
            context=cfg.context,
            loss_kind=cfg.loss,
            device=device,
            seed=cfg.seed,
            rank=rank,
            first_step=state.step,
            after_step=after_step,
            precision=precision,
        )
        if steps == 0:
            raise BadInput(
                f"worker {rank} got no training rows: the training split has fewer "
                f"rows than the {world} workers"
            )
        seconds = time.time() - started
        totals = torch.tensor([loss_sum, steps, images], dtype=torch.float64, device=device)
        slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        scheduler.step()
        state.step += steps
        started = time.time()
        sums = tl.validate(
            model,
            val_data.iter_torch_batches(batch_size=cfg.batch_size),
            device=device,
            rank=rank,
            world=world,
            threshold=cfg.threshold,
            precision=precision,
        )
        dist.all_reduce(sums)
        metrics = {
            "epoch": epoch + 1,
            "step": state.step,
            "train_loss": float(totals[0] / totals[1]),
            "train_images": int(totals[2]),
            "train_seconds": float(slowest[0]),
            "images_per_s": float(totals[2] / slowest[0]),
            "val_seconds": time.time() - started,
            **tl.validation_metrics(sums, cfg.threshold),
            **restored,
        }
        state.epoch = epoch + 1
        state.best_nme = min(state.best_nme, metrics["val_nme"])
        state.history.append(metrics)
        if rank == 0:
            failures = 100 * metrics[f"val_failure_rate@{cfg.threshold:g}"]
            log.info(
                f"epoch {epoch + 1}/{cfg.epochs} step {state.step}: train loss "
                f"{metrics['train_loss']:.4f} | val NME {100 * metrics['val_nme']:.2f} % "
                f"(failure {failures:.1f} %) | {metrics['images_per_s']:.1f} images/s"
            )
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:  # one copy of the DDP-synchronised state is enough
                tl.save_state(directory, model, optimizer, scheduler, state)
                saved = ray.train.Checkpoint.from_directory(directory)
            name = f"epoch-{epoch + 1:04d}"
            ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=name)
    return {"epoch": state.epoch, "step": state.step, "model_version": info.version}


def export_best(cfg: FinetuneConfig, result) -> FinetuneSummary:
    """Write the best checkpoint (lowest ``val_nme``) as a model file and the run summary."""
    from pipeline.io.storage import redact, write_bytes
    from pipeline.model.network import build_model, save_model
    from pipeline.training.loop import PROGRESS_FILE, load_state

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
    metadata = {
        "run": cfg.name,
        "checkpoint": best_checkpoint.path,
        "best": best,
        "init": redact(cfg.weights or cfg.init),
        "config": cfg.public_dict(),
    }
    version = save_model(model, export, metadata=metadata, storage_options=cfg.storage_options)
    summary = FinetuneSummary(
        run_dir_uri(cfg), export, version, best, history, dict(result.metrics or {})
    )
    record = {**asdict(summary), "config": cfg.public_dict()}
    write_bytes(
        f"{run_dir_uri(cfg)}/finetune.json",
        json.dumps(record, indent=2).encode(),
        cfg.storage_options,
    )
    log.info(
        "exported the best checkpoint (epoch %d, val NME %.2f %%) to %s, version %s",
        best["epoch"],
        100 * best["val_nme"],
        export,
        version,
    )
    return summary
