"""The fine-tuning job's configuration and where its run lives; free of Ray.

``FinetuneConfig`` is built by ``pipeline.cli.train`` and travels to every Ray Train worker as a
plain dict. A run lives under ``<storage_path>/<name>`` at any fsspec URI: Ray Train's checkpoints
(``epoch-NNNN/``), the exported model file and ``finetune.json``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.config.errors import BadInput
from pipeline.config.options import above, at_least, check_declared, option, within
from pipeline.io.shards import FORMATS
from pipeline.io.storage import redact_values, storage_options_arg
from pipeline.model.geometry import DEVICES, INIT_CHOICES, OLD_DEVICES, PRECISIONS
from pipeline.model.metrics import DEFAULT_THRESHOLD
from pipeline.stages.preprocess import DEFAULT_MARGIN, DEFAULT_MAX_PIXELS

LOSSES = ("l1", "smooth_l1", "wing")
SCHEDULES = ("cosine", "constant")
# pyarrow reads these natively; Ray Train then needs no fsspec wrapper for them.
NATIVE_PROTOCOLS = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
DATA, MODEL, AUG, RUN = ("labelled data", "model and optimisation",
                         "augmentation (labels stay exact)", "execution")


@dataclass(frozen=True)
class LabelledData:
    """How labelled shards are read: shared by fine-tuning and evaluation."""

    format: str = option("shard layout", default="auto", choices=FORMATS, group=DATA)
    image_column: str = option("Parquet: image bytes column", default="image", group=DATA)
    key_column: str = option("Parquet: sample key column", default="key", group=DATA)
    margin: float = option(
        "face box grown by this fraction per side (keep it equal to the inference job's)",
        default=DEFAULT_MARGIN, bounds=within(0, 2), group=DATA)
    val_fraction: float = option(
        "share of keys (stable hash) held out for validation, in (0, 1)", default=0.05,
        group=DATA)
    storage_options: dict[str, Any] = option(
        "fsspec options as JSON (or @file.json), flat or keyed by protocol",
        default_factory=dict, parse=storage_options_arg, group=DATA)
    max_pixels: int = option(default=DEFAULT_MAX_PIXELS, cli=False, bounds=at_least(1))


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentations; ``AugmentConfig.none()`` turns them all off."""

    flip_prob: float = option("horizontal flip with the 68-point swap", default=0.5,
                              bounds=within(0, 1), group=AUG)
    max_rotation: float = option("degrees, uniform in [-max, max]", default=20.0,
                                 bounds=at_least(0), group=AUG)
    max_scale: float = option("crop scale 1 +- this", default=0.1,
                              bounds=within(0, 1, hi_open=True), group=AUG)
    max_shift: float = option("crop shift, fraction of its side", default=0.05,
                              bounds=at_least(0), group=AUG)
    colour_jitter: float = option("brightness/contrast/saturation 1 +- this", default=0.3,
                                  bounds=within(0, 1, hi_open=True), group=AUG)
    blur_prob: float = option("share of blurred samples", default=0.2, bounds=within(0, 1),
                              group=AUG)
    max_blur: float = option("gaussian sigma in pixels of the 224x224 input", default=1.5,
                             bounds=at_least(0), group=AUG)

    def __post_init__(self):
        check_declared(self)  # the ranges, as declared with each option

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation: the model input is the plain crop."""
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(LabelledData):
    """Everything the fine-tuning job needs; the ``finetune`` command line is derived from it
    (with ``AugmentConfig``'s fields, gathered into ``augment``)."""

    input: str = option(
        "labelled shards (tar with landmarks in the sidecar, or Parquet), any fsspec URI")
    val_input: str | None = option(
        "separate validation shards (default: a hash split of --input)", default=None)
    storage_path: str = option("checkpoint root: local path, s3://...")
    name: str = option("run name; the same name resumes")
    export: str | None = option("model file URI (default <storage-path>/<name>/model.pt)",
                                default=None)
    context: float = option(
        "training crops read this much larger than the model crop", default=1.5,
        bounds=at_least(1), group=AUG)
    weights: str | None = option("start from this model file", default=None, group=MODEL)
    init: str = option("without --weights: imagenet (downloads once) or random",
                       default="imagenet", choices=INIT_CHOICES, group=MODEL)
    seed: int = option("seed of the random init, the split's order and the augmentations",
                       default=0, group=MODEL)
    freeze_features: bool = option(
        "train only the head; the conv backbone stays as initialised", default=False, group=MODEL)
    backbone_lr_mult: float = option("backbone learning rate = lr x this", default=0.1,
                                     bounds=at_least(0), group=MODEL)
    epochs: int = option("passes over the training data", default=10, bounds=at_least(1),
                         group=MODEL)
    batch_size: int = option("samples per step, per worker", default=32, bounds=at_least(1),
                             group=MODEL)
    lr: float = option("learning rate (of the head; the backbone's is lr x --backbone-lr-mult)",
                       default=1e-3, bounds=above(0), group=MODEL)
    weight_decay: float = option("AdamW weight decay", default=1e-4, bounds=at_least(0),
                                 group=MODEL)
    loss: str = option("wing, or l1 / smooth_l1 on the normalised points", default="wing",
                       choices=LOSSES, group=MODEL)
    lr_schedule: str = option("learning rate over the steps", default="cosine",
                              choices=SCHEDULES, group=MODEL)
    augment: dict[str, float] = option(default_factory=dict, cli=False)  # AugmentConfig fields
    num_workers: int = option("Ray Train workers (DDP)", default=1, bounds=at_least(1),
                              group=RUN)
    device: str = option("auto: one GPU per worker when the cluster has GPUs", default="auto",
                         choices=DEVICES,
                         old_values=OLD_DEVICES, group=RUN)
    precision: str = option(
        "bf16 (autocast for the backbone, the head and the loss in fp32) or fp32; auto: bf16 on "
        "GPUs, fp32 on CPUs", default="auto", choices=PRECISIONS, group=RUN)
    cpus_per_worker: float = option("CPUs each training worker reserves", default=1.0,
                                    bounds=above(0), group=RUN)
    threads_per_worker: int | None = option("torch threads on CPU workers", default=None,
                                            bounds=at_least(1), group=RUN)
    reader_cpus: float = option("CPUs per read task", default=1.0, bounds=above(0), group=RUN)
    cache: bool = option("keep decoded crops in the Ray object store (when the data fits)",
                         default=False, group=RUN)
    shuffle_buffer: int = option("rows, per worker", default=256, bounds=at_least(0),
                                 group=RUN)
    keep_best: int = option("checkpoints kept, by val NME", default=3, bounds=at_least(1),
                            group=RUN)
    max_failures: int = option("worker-group restarts from the last checkpoint", default=2,
                               bounds=at_least(0), group=RUN)
    ray_address: str | None = option("Ray cluster (default: RAY_ADDRESS, else local Ray)",
                                     default=None, group=RUN)
    threshold: float = option(default=DEFAULT_THRESHOLD, cli=False)

    def __post_init__(self):
        check_declared(self)  # choices and ranges, as declared with each option
        if not self.val_input and not 0 < self.val_fraction < 1:
            raise BadInput(
                f"val_fraction must be in (0, 1) without val_input, got {self.val_fraction}"
            )
        if not self.name or "/" in self.name:
            raise BadInput(f"name must be a non-empty folder name, got {self.name!r}")
        AugmentConfig(**self.augment)  # raises ValueError on a bad range

    def public_dict(self) -> dict[str, Any]:
        """The config without secrets: storage option values are left out."""
        data = redact_values(asdict(self))  # URL passwords and presigned query strings
        data["storage_options"] = sorted(self.storage_options)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


# What a run's checkpoints were trained on and how: a rerun under the same --name resumes
# from them, so it must keep these (workers, caching, augmentation and the like may change).
RESUME_KEYS = ("input", "val_input", "val_fraction", "format", "image_column", "key_column",
               "margin", "context", "weights", "init", "seed", "freeze_features",
               "backbone_lr_mult", "epochs", "batch_size", "lr", "weight_decay", "loss",
               "lr_schedule")


def resume_conflicts(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, tuple]:
    """``{setting: (saved value, given value)}`` of the ``RESUME_KEYS`` that differ between
    a run's saved config and a rerun's (numbers compared as numbers: YAML reads 1e-3 back
    as a string or a float)."""
    def same(a: Any, b: Any) -> bool:
        try:
            return a == b or float(a) == float(b)
        except (TypeError, ValueError):
            return False

    return {k: (saved.get(k), given.get(k)) for k in RESUME_KEYS
            if k in saved and not same(saved.get(k), given.get(k))}


@dataclass
class FinetuneSummary:
    """What a finished (or resumed and finished) run wrote."""

    run_dir: str
    export: str
    model_version: str
    best: dict[str, Any]  # the metrics of the exported checkpoint
    history: list[dict[str, Any]]  # one entry per epoch, carried through resumes
    last: dict[str, Any]  # the final report, including where its attempt resumed from


def resolve_storage(uri: str, storage_options: dict[str, Any] | None = None):
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig`` from any fsspec URI.

    Local paths become absolute; ``s3://``, ``gs://`` ... without options go to Ray as they are
    (pyarrow's own filesystems); anything else, or any URI with storage options (an S3 endpoint,
    credentials), goes through fsspec wrapped as a pyarrow filesystem.
    """
    from pipeline.io.storage import filesystem, options_for, protocol_of

    protocol = protocol_of(uri)
    if protocol in ("file", "local"):
        return os.path.abspath(uri.split("://", 1)[-1]), None
    if protocol in NATIVE_PROTOCOLS and not options_for(uri, storage_options):
        return uri, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri, storage_options)
    return path, PyFileSystem(FSSpecHandler(fs))


def run_dir_uri(cfg: FinetuneConfig) -> str:
    """Where the run's checkpoints, model file and summary live, as an fsspec URI."""
    return f"{cfg.storage_path.rstrip('/')}/{cfg.name}"
