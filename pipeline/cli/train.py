"""Command line of the training side: ``finetune``, ``evaluate`` and ``import-pts``.

``add_*_parser(subparsers)`` add one subcommand each (``set_defaults(run=...)``, ``run(args) ->
int``) so ``pipeline.cli.main`` can mount them; ``main_finetune`` / ``main_evaluate`` /
``main_import_pts`` take an argv and are what ``jobs/finetune.py`` and ``jobs/evaluate.py`` call.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields

from pipeline.cli.config import add_config_argument
from pipeline.evaluation.evaluate import EvalConfig
from pipeline.io.labels import SPLITS
from pipeline.io.shards import FORMATS
from pipeline.io.storage import resolve_storage_options, storage_options_arg
from pipeline.model.network import INIT_CHOICES
from pipeline.stages.preprocess import DEFAULT_MARGIN
from pipeline.training.config import DEVICES, FinetuneConfig
from pipeline.training.importer import ANNOTATIONS
from pipeline.training.loop import LOSSES, SCHEDULES

FINETUNE_EPILOG = """\
examples:
  landmarks generate --output data/synthetic --shards 8 --per-shard 500
  landmarks finetune --input data/synthetic --storage-path runs --name synth-v1 --init random
  ray job submit --working-dir . -- python jobs/finetune.py --input s3://bucket/labelled/ \\
      --storage-path s3://bucket/runs --name v3 --num-workers 4 --cache

Rerunning with the same --storage-path and --name resumes from the latest checkpoint. The best
checkpoint is exported to --export (default <storage-path>/<name>/model.pt), the model file that
`landmarks infer --weights` loads.
"""




def _data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("labelled data")
    data.add_argument("--format", choices=FORMATS, default="auto", help="shard layout")
    data.add_argument("--image-column", default="image", help="Parquet: image bytes column")
    data.add_argument("--key-column", default="key", help="Parquet: sample key column")
    data.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help=f"face box grown by this fraction per side (default {DEFAULT_MARGIN}; "
        "keep it equal to the inference job's)",
    )
    data.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of keys (stable hash) held out for validation (default 0.05)",
    )
    data.add_argument(
        "--storage-options",
        type=storage_options_arg,
        default={},
        help="fsspec options as JSON (or @file.json), flat or keyed by protocol",
    )


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """The ``finetune`` subcommand: Ray Train fine-tuning that exports a model file."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune the landmark model on labelled shards (Ray Train)",
        epilog=FINETUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune the VGG16 keypoint model with Ray Train (DDP), checkpoint to a "
        "storage path, resume by name, export the best model file.",
    )
    add_config_argument(p)
    p.add_argument(
        "--input",
        required=True,
        help="labelled shards (tar with landmarks in the sidecar, or Parquet), any fsspec URI",
    )
    p.add_argument(
        "--val-input", help="separate validation shards (default: a hash split of --input)"
    )
    p.add_argument("--storage-path", required=True, help="checkpoint root: local path, s3://...")
    p.add_argument("--name", required=True, help="run name; the same name resumes")
    p.add_argument("--export", help="model file URI (default <storage-path>/<name>/model.pt)")
    _data_arguments(p)
    model = p.add_argument_group("model and optimisation")
    model.add_argument("--weights", help="start from this model file")
    model.add_argument(
        "--init",
        choices=INIT_CHOICES,
        default="imagenet",
        help="without --weights: imagenet (downloads once) or random",
    )
    model.add_argument("--seed", type=int, default=0)
    model.add_argument(
        "--freeze-features",
        action="store_true",
        help="train only the head; the conv backbone stays as initialised",
    )
    model.add_argument(
        "--backbone-lr-mult",
        type=float,
        default=0.1,
        help="backbone learning rate = lr x this (default 0.1)",
    )
    model.add_argument("--epochs", type=int, default=10)
    model.add_argument("--batch-size", type=int, default=32, help="per worker (default 32)")
    model.add_argument("--lr", type=float, default=1e-3)
    model.add_argument("--weight-decay", type=float, default=1e-4)
    model.add_argument("--loss", choices=LOSSES, default="wing")
    model.add_argument("--lr-schedule", choices=SCHEDULES, default="cosine")
    aug = p.add_argument_group("augmentation (labels stay exact)")
    aug.add_argument("--no-augment", action="store_true", help="turn every augmentation off")
    for flag, default, text in (
        ("--flip-prob", 0.5, "horizontal flip with the 68-point swap"),
        ("--max-rotation", 20.0, "degrees"),
        ("--max-scale", 0.1, "crop scale 1 +- this"),
        ("--max-shift", 0.05, "crop shift, fraction of its side"),
        ("--colour-jitter", 0.3, "brightness/contrast/saturation 1 +- this"),
        ("--blur-prob", 0.2, "share of blurred samples"),
        ("--max-blur", 1.5, "gaussian sigma"),
        ("--context", 1.5, "training crops read this much larger than the model crop"),
    ):
        aug.add_argument(flag, type=float, default=default, help=f"{text} (default {default})")
    run = p.add_argument_group("execution")
    run.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP)")
    run.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: one GPU per worker when the cluster has GPUs",
    )
    run.add_argument("--cpus-per-worker", type=float, default=1.0)
    run.add_argument("--threads-per-worker", type=int, help="torch threads on CPU workers")
    run.add_argument("--reader-cpus", type=float, default=1.0, help="CPUs per read task")
    run.add_argument(
        "--cache",
        action="store_true",
        help="keep decoded crops in the Ray object store (when the data fits)",
    )
    run.add_argument("--shuffle-buffer", type=int, default=256, help="rows, per worker")
    run.add_argument("--keep-best", type=int, default=3, help="checkpoints kept, by val NME")
    run.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="worker-group restarts from the last checkpoint (default 2)",
    )
    run.add_argument("--ray-address", help="Ray cluster (default: RAY_ADDRESS, else local Ray)")
    run.add_argument("--fail-at-step", type=int, help=argparse.SUPPRESS)  # fault injection
    p.set_defaults(run=run_finetune)
    return p


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The frozen config of the parsed ``finetune`` arguments."""
    from pipeline.training.augment import AugmentConfig

    if args.no_augment:
        augment = asdict(AugmentConfig.none())
    else:
        augment = {f.name: getattr(args, f.name) for f in fields(AugmentConfig)}
    # Every config field that has an option of the same name comes from it; the rest default.
    values = {
        f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if hasattr(args, f.name)
    }
    values["storage_options"] = resolve_storage_options(
        args.storage_options,
        [args.input, args.val_input, args.storage_path, args.export, args.weights],
    )
    values["augment"] = augment
    return FinetuneConfig(**values)


def run_finetune(args: argparse.Namespace) -> int:
    from pipeline.backend.trainer import main
    from pipeline.cli.main import announce_config

    cfg = finetune_config(args)
    run_dir = f"{cfg.storage_path.rstrip('/')}/{cfg.name}"
    announce_config(args, f"{run_dir}/job-config.yaml", cfg.storage_options)
    summary = main(cfg)
    best = summary.best
    print(
        f"summary: best epoch {best['epoch']}, val NME {100 * best['val_nme']:.2f} % -> "
        f"{summary.export} (model {summary.model_version}); run in {summary.run_dir}"
    )
    return 0


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """The ``evaluate`` subcommand: NME, failure rate, AUC, per region; JSON + CED PNG."""
    p = subparsers.add_parser(
        "evaluate",
        help="score a model file or inference output against labelled shards",
        description="Inter-ocular NME (points 36, 45), failure rate and AUC at a threshold, NME "
        "per region; writes a JSON report and a CED curve PNG.",
    )
    add_config_argument(p)
    p.add_argument("--labels", required=True, help="labelled shards, any fsspec URI")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="model file to run on the labelled crops")
    source.add_argument("--predictions", help="Parquet output of the inference job")
    p.add_argument("--output", required=True, help="report JSON URI")
    p.add_argument("--ced", help="CED plot PNG URI (default: the report path with .png)")
    p.add_argument(
        "--split",
        choices=SPLITS,
        default="all",
        help="score only the hash split of the fine-tuning job (with --val-fraction)",
    )
    p.add_argument("--threshold", type=float, default=0.08, help="failure / AUC threshold")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=DEVICES, default="auto")
    _data_arguments(p)
    p.set_defaults(run=run_evaluate)
    return p


def run_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluation.evaluate import main, report_line

    values = {f.name: getattr(args, f.name) for f in fields(EvalConfig) if hasattr(args, f.name)}
    values["storage_options"] = resolve_storage_options(
        args.storage_options, [args.labels, args.weights, args.predictions, args.output, args.ced]
    )
    report = main(EvalConfig(**values))
    print(f"summary: {report_line(report)} -> {args.output}")
    return 0


def add_import_pts_parser(subparsers) -> argparse.ArgumentParser:
    """The ``import-pts`` subcommand: a folder of images + .pts files -> labelled tar shards."""
    p = subparsers.add_parser(
        "import-pts",
        help="turn images with 300-W .pts annotations into labelled tar shards",
        description="For 300-W, HELEN, LFPW, AFW, iBUG or your own data: every image beside a "
        "same-named .pts (or .json with 'landmarks') file becomes a labelled sample.",
    )
    p.add_argument("--input", required=True, help="folder, searched recursively")
    p.add_argument("--output", required=True, help="folder/prefix for part-NNNNN.tar")
    p.add_argument(
        "--origin",
        type=int,
        choices=(0, 1),
        required=True,
        help="1: the files count pixels from 1 (300-W and its parts); 0: from 0",
    )
    p.add_argument("--annotation", choices=ANNOTATIONS, default="pts")
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--storage-options", type=storage_options_arg, default={})
    p.set_defaults(run=run_import_pts)
    return p


def run_import_pts(args: argparse.Namespace) -> int:
    from pipeline.training.importer import import_annotated_folder

    options = resolve_storage_options(args.storage_options, [args.input, args.output])
    summary = import_annotated_folder(
        args.input, args.output, args.origin, args.annotation, args.per_shard, options
    )
    for path, reason in summary.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(
        f"summary: {summary.samples} labelled samples in {len(summary.shards)} shard(s) under "
        f"{args.output}, {len(summary.skipped)} skipped"
    )
    return 0 if summary.samples else 2


def _main(command: str, argv: Sequence[str] | None) -> int:
    from pipeline.cli.main import main  # the one command line: --config handling included

    return main([command, *(sys.argv[1:] if argv is None else argv)])


def main_finetune(argv: Sequence[str] | None = None) -> int:
    """``finetune`` from an argv without the subcommand (``jobs/finetune.py``)."""
    return _main("finetune", argv)


def main_evaluate(argv: Sequence[str] | None = None) -> int:
    """``evaluate`` from an argv without the subcommand (``jobs/evaluate.py``)."""
    return _main("evaluate", argv)


def main_import_pts(argv: Sequence[str] | None = None) -> int:
    """``import-pts`` from an argv without the subcommand."""
    return _main("import-pts", argv)
