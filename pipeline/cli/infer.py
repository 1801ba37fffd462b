"""``landmarks infer`` (the inference job) and ``landmarks generate`` (a synthetic archive)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli.common import Command, PushOption, announce_config, pushed_outcome
from pipeline.config.errors import BadInput
from pipeline.config.options import option, positive_int, values_for
from pipeline.inference.config import DEMO_DIR, IO, InferConfig
from pipeline.io.storage import redact, resolve_storage_options, storage_options_arg

DEMO_SHARDS, DEMO_PER_SHARD = 4, 16

INFER_EPILOG = """\
examples:
  landmarks infer                                   # demo: sample archive -> local Ray -> Parquet
  landmarks infer --input s3://bucket/shards/ --output s3://bucket/landmarks/ \\
                  --weights s3://bucket/models/landmarks.pt
  ray job submit --working-dir . -- python jobs/infer.py --input ... --output ...

Without --weights the model has random (or --init imagenet) weights: the job runs, but the
landmarks mean nothing. Pass a model file written by the fine-tuning job (pipeline.model).

A rerun with the same --output skips shards already done for the same model and settings.
Exit status: 0 done; 1 a shard stopped part-way or more than --max-error-fraction of the
samples have errors (see the error and error_kind columns); 2 bad arguments or input.
"""


@dataclass(frozen=True)
class InferCommand:
    """Options of ``landmarks infer`` that are not settings of the job itself."""

    preview: str | None = option("save a PNG of a few images with landmarks drawn",
                                 default=None, group=IO)


# The demo runs without --input and --output: they are optional here, not in the job's config.
OPTIONAL_IO = {"input": {"required": False}, "output": {"required": False}}


def infer_config(args: argparse.Namespace) -> InferConfig:
    """The job's config from the parsed options (storage options resolved for its URIs)."""
    return InferConfig(**values_for(InferConfig, args, storage_options=resolve_storage_options(
        args.storage_options, [args.input, args.output, args.weights])))


def run_infer(args: argparse.Namespace) -> int:
    from pipeline.inference.job import run_inference
    from pipeline.report.preview import save_preview

    if args.input is None:
        from pipeline.demo.synthetic import write_sample_archive

        args.input = str(Path(DEMO_DIR) / "shards")
        args.output = args.output or str(Path(DEMO_DIR) / "landmarks")
        args.preview = args.preview or str(Path(DEMO_DIR) / "preview.png")
        if not Path(args.input).exists():
            logging.info("writing a sample archive of %d synthetic faces to %s",
                         DEMO_SHARDS * DEMO_PER_SHARD, args.input)
            write_sample_archive(args.input, DEMO_SHARDS, DEMO_PER_SHARD, seed=0)
    elif args.output is None:
        raise BadInput("--output is required with --input (without both: the demo)")
    cfg = infer_config(args)
    config = announce_config(args)  # saved beside the output once the job has started
    with pushed_outcome(args, "landmarks_infer", cfg.output) as outcome:
        summary = run_inference(cfg, config)
        outcome.success = not summary.failed
        outcome.rows, outcome.errors = summary.samples, summary.errors
        outcome.errors_by_kind = dict(summary.errors_by_kind)
    print(f"summary: {redact(summary.line())}", flush=True)
    if summary.report:
        print(f"report: {redact(summary.report)} (open it in a browser)")
    if args.preview:
        drawn = save_preview(args.input, args.output, args.preview, fmt=args.format,
                             storage_options=cfg.storage_options)
        print(f"preview: {drawn} images with landmarks drawn -> {args.preview}")
    if args.weights is None:
        print("note: no --weights given, so the model is untrained and its landmarks are "
              "meaningless; pass a fine-tuned model file with --weights URI")
    return 1 if summary.failed else 0



def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="folder/prefix for faces-*.tar (any URI)")
    p.add_argument("--shards", type=positive_int, default=DEMO_SHARDS,
                   help="tar shards to write (default %(default)s)")
    p.add_argument("--per-shard", type=positive_int, default=DEMO_PER_SHARD,
                   help="faces per shard (default %(default)s)")
    p.add_argument("--width", type=positive_int, default=320,
                   help="image width (default %(default)s)")
    p.add_argument("--height", type=positive_int, default=240,
                   help="image height (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="the faces drawn depend only on it (default %(default)s)")
    p.add_argument("--storage-options", type=storage_options_arg, default={},
                   help="fsspec options as JSON, or @file.json (as for infer)")


def run_generate(args: argparse.Namespace) -> int:
    from pipeline.demo.synthetic import write_sample_archive

    uris = write_sample_archive(args.output, args.shards, args.per_shard, seed=args.seed,
                                image_size=(args.width, args.height),
                                storage_options=resolve_storage_options(
                                    args.storage_options, [args.output]))
    print(f"wrote {len(uris)} shards x {args.per_shard} faces under {args.output}")
    return 0


COMMANDS = {
    "infer": Command(
        run_infer, epilog=INFER_EPILOG, schema=(InferConfig, InferCommand, PushOption),
        overrides=OPTIONAL_IO,
        description="Find 68 facial landmarks in every image of the input shards and write one "
                    "Parquet file per shard."),
    "generate": Command(run_generate, arguments=generate_arguments),
}
