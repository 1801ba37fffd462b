"""The fine-tuning job's configuration and where its run lives; free of Ray.

``FinetuneConfig`` is built by ``pipeline.cli.train`` and travels to every Ray Train worker as a
plain dict. A run lives under ``<storage_path>/<name>`` at any fsspec URI: Ray Train's checkpoints
(``epoch-NNNN/``), the exported model file and ``finetune.json``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pipeline.model.metrics import DEFAULT_THRESHOLD
from pipeline.stages.preprocess import DEFAULT_MARGIN, DEFAULT_MAX_PIXELS

DEVICES = ("auto", "cuda", "cpu")
# pyarrow reads these natively; Ray Train then needs no fsspec wrapper for them.
NATIVE_PROTOCOLS = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything the fine-tuning job needs; built by ``pipeline.cli.train``."""

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
        from pipeline.model.network import INIT_CHOICES
        from pipeline.training.augment import AugmentConfig
        from pipeline.training.loop import LOSSES, SCHEDULES

        choices = {
            "loss": LOSSES,
            "lr_schedule": SCHEDULES,
            "device": DEVICES,
            "init": INIT_CHOICES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "num_workers", "keep_best", "shuffle_buffer"):
            if getattr(self, name) < (0 if name == "shuffle_buffer" else 1):
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.val_input and not 0 < self.val_fraction < 1:
            raise ValueError(
                f"val_fraction must be in (0, 1) without val_input, got {self.val_fraction}"
            )
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


def inject_fault_once(cfg: FinetuneConfig, step: int) -> None:
    """Fail like a lost worker, once per run and step: a marker in the run folder remembers it,
    so the attempt that restarts from the checkpoint gets past this step."""
    from pipeline.io.storage import filesystem

    fs, marker = filesystem(
        f"{run_dir_uri(cfg)}/_fault-injected-at-step-{step}", cfg.storage_options
    )
    if not fs.exists(marker):
        fs.pipe_file(marker, b"")
        raise RuntimeError(f"fault injected at step {step} (fail_at_step, for testing)")
