"""Command line: ``landmarks infer|generate ...`` (also ``python jobs/infer.py ...``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli.config import (
    add_config_argument,
    apply_config,
    check_config,
    config_path,
    dump_config,
    read_config,
    resolved_config,
    save_config,
    storage_reference,
)
from pipeline.cli.train import add_evaluate_parser, add_finetune_parser, add_import_pts_parser
from pipeline.inference.job import DECODES, DEVICES, InferConfig
from pipeline.io.shards import FORMATS
from pipeline.io.storage import resolve_storage_options, storage_options_arg
from pipeline.model.network import INIT_CHOICES
from pipeline.stages.preprocess import DEFAULT_MARGIN, DEFAULT_MAX_PIXELS
from pipeline.stages.units import DEFAULT_ROWS_PER_FILE

DEMO_DIR = Path("sample-data")
DEMO_SHARDS, DEMO_PER_SHARD = 4, 16

INFER_EPILOG = """\
examples:
  landmarks infer                                   # demo: sample archive -> local Ray -> Parquet
  landmarks infer --input s3://bucket/shards/ --output s3://bucket/landmarks/ \\
                  --weights s3://bucket/models/landmarks.pt
  ray job submit --working-dir . -- python jobs/infer.py --input ... --output ...

Without --weights the model has random (or --init imagenet) weights: the job runs, but the
landmarks mean nothing. Pass a model file written by the fine-tuning job (pipeline.model.network).

A rerun with the same --output skips shards already done for the same model and settings.
Exit status: 0 done; 1 a shard stopped part-way or more than --max-error-fraction of the
samples have errors (see the error and error_kind columns); 2 bad arguments or input.
"""




def add_infer_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", help="shards: a file, folder/prefix or glob at any fsspec URI "
                    "(local path, s3://, gs://). Omitted: generate and use a sample archive")
    io.add_argument("--output", help="folder/prefix for part-<shard>.parquet files "
                    f"(default with the sample archive: {DEMO_DIR}/landmarks)")
    io.add_argument("--format", choices=FORMATS, default="auto",
                    help="shard layout (default: from the file extensions)")
    io.add_argument("--image-column", default="image", help="Parquet: image bytes column")
    io.add_argument("--key-column", default="key", help="Parquet: sample key column")
    io.add_argument("--files-per-shard", type=int, default=256,
                    help="loose images: files per output file (default 256)")
    io.add_argument("--storage-options", type=storage_options_arg, default={},
                    help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://..."}\', '
                         'or @file.json; per store: \'{"s3": {...}, "gs": {...}}\'. '
                         "AWS_ENDPOINT_URL, AWS_PROFILE and AWS_REGION are read too")
    io.add_argument("--preview", help="save a PNG of a few images with landmarks drawn")

    model = parser.add_argument_group("model")
    model.add_argument("--weights", help="model file URI (pipeline.model.network format)")
    model.add_argument("--init", choices=INIT_CHOICES, default="random",
                       help="without --weights: random, or ImageNet features (downloads once)")
    model.add_argument("--seed", type=int, default=0, help="seed of random init (default 0)")

    pre = parser.add_argument_group("preprocessing")
    pre.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                     help=f"grow the sidecar bbox by this fraction per side "
                          f"(default {DEFAULT_MARGIN})")
    pre.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help="refuse images above this many pixels, before decoding them")

    run = parser.add_argument_group("execution")
    run.add_argument("--batch-size", type=int,
                     help="model batch size (default: 512 on GPU, 256 with --compile, 16 on "
                          "CPU); on GPU out-of-memory the actor halves it and goes on")
    run.add_argument("--unit-rows", type=int,
                     help="rows per work unit, the rows one predictor call gets (default: 4096 "
                          "on GPU, 4 batches on CPU; units also stop at 256 MB); small shards are "
                          "bundled up to it, big ones sliced")
    run.add_argument("--rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE,
                     help="a shard with more rows is written as several files, "
                          "part-<shard>.parquet then part-<shard>.c00001.parquet ... "
                          f"(default {DEFAULT_ROWS_PER_FILE})")
    run.add_argument("--num-predictors", type=int,
                     help="predictor actors (default: one per GPU, or 1 on CPU)")
    run.add_argument("--predictor-cpus", type=float,
                     help="CPUs per predictor actor (default: 1 with GPUs, else all but one)")
    run.add_argument("--device", choices=DEVICES, default="auto",
                     help="auto: GPU actors when the cluster has GPUs")
    run.add_argument("--decode", choices=DECODES, default="auto",
                     help="where images are decoded, cropped and resized: cpu (PIL in the read "
                          "tasks), gpu (nvJPEG in the predictor actors; non-JPEG images fall "
                          "back to the CPU per sample), auto (gpu when the cluster has fewer "
                          "than ~50 CPUs per GPU, the cores it takes to keep one H100 fed)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the model in each actor (faster steady state on GPU, "
                          "~1 min of compiling at start; off by default)")
    run.add_argument("--predictor-concurrency", type=int,
                     help="batches each predictor actor works on at once (default: 2 on GPU, "
                          "so copies and host work overlap the GPU's compute; 1 on CPU)")
    run.add_argument("--ray-address", help="Ray cluster (default: RAY_ADDRESS, else local Ray)")
    run.add_argument("--force", action="store_true",
                     help="redo every shard, even those an earlier run completed with the same "
                          "model and settings (default: skip them)")
    run.add_argument("--max-error-fraction", type=float, default=0.01,
                     help="exit with status 1 when more than this share of the samples have "
                          "errors (default 0.01); a shard that stops part-way always does")


def infer_config(args: argparse.Namespace) -> InferConfig:
    return InferConfig(
        input=args.input, output=args.output, weights=args.weights, init=args.init,
        seed=args.seed, format=args.format, image_column=args.image_column,
        key_column=args.key_column, files_per_shard=args.files_per_shard, margin=args.margin,
        max_pixels=args.max_pixels, batch_size=args.batch_size, unit_rows=args.unit_rows,
        rows_per_file=args.rows_per_file,
        num_predictors=args.num_predictors, predictor_cpus=args.predictor_cpus,
        device=args.device, decode=args.decode, compile=args.compile,
        predictor_concurrency=args.predictor_concurrency, ray_address=args.ray_address,
        force=args.force,
        max_error_fraction=args.max_error_fraction,
        storage_options=resolve_storage_options(
            args.storage_options, [args.input, args.output, args.weights]),
    )


def run_infer(args: argparse.Namespace) -> int:
    from pipeline.evaluation.preview import save_preview
    from pipeline.inference.job import run_inference

    if args.input is None:
        from pipeline.demo.synthetic import write_sample_archive

        args.input = str(DEMO_DIR / "shards")
        args.output = args.output or str(DEMO_DIR / "landmarks")
        args.preview = args.preview or str(DEMO_DIR / "preview.png")
        if not Path(args.input).exists():
            logging.info("writing a sample archive of %d synthetic faces to %s",
                         DEMO_SHARDS * DEMO_PER_SHARD, args.input)
            write_sample_archive(args.input, DEMO_SHARDS, DEMO_PER_SHARD, seed=0)
    elif args.output is None:
        raise SystemExit("error: --output is required with --input")
    cfg = infer_config(args)
    config = announce_config(args)  # saved beside the output once the job has started
    summary = run_inference(cfg, config)
    print(f"summary: {summary.line()}", flush=True)
    if args.preview:
        drawn = save_preview(args.input, args.output, args.preview, fmt=args.format,
                             storage_options=cfg.storage_options)
        print(f"preview: {drawn} images with landmarks drawn -> {args.preview}")
    if args.weights is None:
        print("note: no --weights given, so the model is untrained and its landmarks are "
              "meaningless; pass a fine-tuned model file with --weights URI")
    return 1 if summary.failed else 0


def run_generate(args: argparse.Namespace) -> int:
    from pipeline.demo.synthetic import write_sample_archive

    uris = write_sample_archive(args.output, args.shards, args.per_shard, seed=args.seed,
                                image_size=(args.width, args.height),
                                storage_options=resolve_storage_options(
                                    args.storage_options, [args.output]))
    print(f"wrote {len(uris)} shards x {args.per_shard} faces under {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="landmarks", description="68-point facial landmarks over image archives on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    infer = commands.add_parser(
        "infer", help="run the inference job", epilog=INFER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find 68 facial landmarks in every image of the input shards and write "
                    "one Parquet file per shard.")
    add_infer_arguments(infer)
    infer.set_defaults(run=run_infer)

    generate = commands.add_parser("generate", help="write a synthetic labelled face archive")
    generate.add_argument("--output", required=True, help="folder/prefix for faces-*.tar")
    generate.add_argument("--shards", type=int, default=4)
    generate.add_argument("--per-shard", type=int, default=16)
    generate.add_argument("--width", type=int, default=320)
    generate.add_argument("--height", type=int, default=240)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--storage-options", type=storage_options_arg, default={})
    generate.set_defaults(run=run_generate)
    add_finetune_parser(commands)
    add_evaluate_parser(commands)
    add_import_pts_parser(commands)
    # Imported here: both modules use pipeline.cli.main themselves.
    from pipeline.ops.nightly import add_nightly_parser
    from pipeline.ops.submit import add_submit_parser

    add_nightly_parser(commands)
    add_submit_parser(commands)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line, applying the subcommand's ``--config FILE`` first (flags win).

    Raises ``ConfigError`` (a ``ValueError``) for a config that names an unknown option or
    gives one a value of the wrong type; ``SystemExit`` for bad flags, as argparse does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    position = next((i for i, a in enumerate(argv) if a in commands.choices), None)
    job_parser = commands.choices[argv[position]] if position is not None else None
    config, reference = {}, None
    if job_parser is not None:
        rest = argv[position + 1:]
        path = config_path(rest)
        if path and any(a.dest == "config" for a in job_parser._actions):
            config = read_config(path, resolve_storage_options({}, [path]))
            apply_config(job_parser, check_config(job_parser, config, path))
        reference = storage_reference(job_parser, rest, config)
    args = parser.parse_args(argv)
    args.job_parser, args.storage_reference = job_parser, reference
    return args


def job_config(args: argparse.Namespace) -> dict:
    """The job's resolved settings (config file, flags and defaults merged; no secrets)."""
    return resolved_config(args.job_parser, args, args.storage_reference)


def announce_config(args: argparse.Namespace, uri: str | None = None,
                    storage_options=None, leave_out: Sequence[str] = ()) -> dict:
    """Print the resolved config (without the ``leave_out`` options), save it to ``uri`` if
    given, and return it."""
    config = {k: v for k, v in job_config(args).items() if k not in leave_out}
    print(f"resolved config:\n{dump_config(config)}", end="", flush=True)
    if uri:
        save_config(config, uri, storage_options)
        logging.info("resolved config saved to %s (reuse it with --config)", uri)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        args = parse_args(argv)
        return args.run(args)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
