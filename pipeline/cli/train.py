"""The training side's commands: ``finetune``, ``evaluate`` and ``import-pts``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass

from pipeline.cli.common import Command, PushOption, announce_config, job_config, pushed_outcome
from pipeline.config.errors import BadInput
from pipeline.config.options import option, positive_int, values_for
from pipeline.evaluation.config import EvalConfig
from pipeline.io.storage import (
    read_bytes,
    redact,
    resolve_storage_options,
    storage_options_arg,
)
from pipeline.training.config import AUG, AugmentConfig, FinetuneConfig, resume_conflicts
from pipeline.training.importer import ANNOTATIONS

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


@dataclass(frozen=True)
class FinetuneCommand:
    """Options of ``landmarks finetune`` besides the job's settings."""

    no_augment: bool = option("turn every augmentation off", default=False, group=AUG)


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The frozen config of the parsed ``finetune`` arguments."""
    none = asdict(AugmentConfig.none())
    augment = none if args.no_augment else values_for(AugmentConfig, args)
    storage_options = resolve_storage_options(
        args.storage_options,
        [args.input, args.val_input, args.storage_path, args.export, args.weights],
    )
    return FinetuneConfig(**values_for(FinetuneConfig, args, augment=augment,
                                       storage_options=storage_options))


def run_finetune(args: argparse.Namespace) -> int:
    from pipeline.backend.trainer import main

    cfg = finetune_config(args)
    run_dir = f"{cfg.storage_path.rstrip('/')}/{cfg.name}"
    check_resume(args, f"{run_dir}/job-config.yaml", cfg.storage_options)
    announce_config(args, f"{run_dir}/job-config.yaml", cfg.storage_options)
    with pushed_outcome(args, "landmarks_finetune", run_dir) as outcome:
        summary = main(cfg)
        outcome.success = True
        outcome.rows = sum(int(h.get("train_images") or 0) for h in summary.history)
    best = summary.best
    print(
        f"summary: best epoch {best['epoch']}, val NME {100 * best['val_nme']:.2f} % -> "
        f"{summary.export} (model {summary.model_version}); run in {summary.run_dir}"
    )
    return 0


def check_resume(args: argparse.Namespace, saved_uri: str, storage_options) -> None:
    """A rerun under an existing --name resumes its checkpoints: with other data or training
    settings it would go on silently from weights trained otherwise (and overwrite the saved
    config). Refused, saying what differs and what to do (``ValueError``: exit 2)."""
    import yaml

    try:
        saved = yaml.safe_load(read_bytes(saved_uri, storage_options)) or {}
    except FileNotFoundError:
        return  # a new run
    conflicts = resume_conflicts(saved, job_config(args))
    if conflicts:
        listed = "; ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in
                           conflicts.items())
        raise BadInput(
            f"run {args.name!r} under {redact(args.storage_path)} was trained with other "
            f"settings ({listed}), and a rerun under its name resumes its checkpoints. To "
            f"resume it, rerun with its settings (--config {redact(saved_uri)}); to train with "
            "these, give the run a new --name")


def run_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluation.evaluate import main, report_line

    storage_options = resolve_storage_options(
        args.storage_options, [args.labels, args.weights, args.predictions, args.report, args.ced]
    )
    report = main(EvalConfig(**values_for(EvalConfig, args, storage_options=storage_options)))
    print(f"summary: {report_line(report)} -> {args.report}")
    print(f"report: {report['report_html']}")
    return 0



def import_pts_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder, searched recursively")
    p.add_argument("--output", required=True, help="folder/prefix for part-NNNNN.tar")
    p.add_argument(
        "--origin",
        type=int,
        choices=(0, 1),
        required=True,
        help="1: the files count pixels from 1 (300-W and its parts); 0: from 0",
    )
    p.add_argument("--annotation", choices=ANNOTATIONS, default="pts",
                   help="the annotation beside each image: IMAGE-STEM.pts (300-W) or "
                        'IMAGE-STEM.json ({"landmarks": [[x, y], ...]}) (default %(default)s)')
    p.add_argument("--per-shard", type=positive_int, default=1000,
                   help="labelled images per tar shard (default %(default)s)")
    p.add_argument("--storage-options", type=storage_options_arg, default={},
                   help="fsspec options as JSON, or @file.json (as for infer)")


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


COMMANDS = {
    "finetune": Command(
        run_finetune, epilog=FINETUNE_EPILOG,
        schema=(FinetuneConfig, AugmentConfig, FinetuneCommand, PushOption),
        description="Fine-tune the VGG16 keypoint model with Ray Train (DDP), checkpoint to a "
                    "storage path, resume by name, export the best model file."),
    "evaluate": Command(
        run_evaluate, schema=(EvalConfig,),
        description="Inter-ocular NME (points 36, 45), failure rate and AUC at a threshold, NME "
                    "per region; writes a JSON report, a CED curve PNG and a page with both "
                    "(.html)."),
    "import-pts": Command(
        run_import_pts, arguments=import_pts_arguments,
        description="For 300-W, HELEN, LFPW, AFW, iBUG or your own data: every image beside a "
                    "same-named .pts (or .json with 'landmarks') file becomes a labelled "
                    "sample."),
}
