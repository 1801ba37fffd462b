"""``landmarks nightly`` (the inference job per date partition) and ``landmarks ledger``."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from pipeline.cli.common import Command, PushOption, announce_config, pushed_outcome
from pipeline.cli.infer import infer_config
from pipeline.config.errors import BadInput
from pipeline.config.files import CONFIG_FILE
from pipeline.config.options import at_least, option, positive_int
from pipeline.inference.config import InferConfig
from pipeline.io.storage import resolve_storage_options, storage_options_arg
from pipeline.ops.nightly import (
    RUN_OPTIONS,
    Nights,
    default_date,
    first_night,
    ledger_dir,
    ledger_table,
    parse_date,
    read_ledger,
    root_of,
    run_nights,
)

NIGHTLY_EPILOG = """\
examples:
  landmarks nightly --input s3://bucket/incoming/ --output s3://bucket/landmarks/ \\
                    --weights s3://bucket/models/landmarks.pt          # yesterday (UTC)
  landmarks nightly --input ... --output ... --date 2026-11-20         # one given night
  landmarks nightly --input ... --output ... --since 2026-11-01        # catch up
  landmarks nightly --input 's3://b/in/{date}/' --output 's3://b/out/{date}/' ...
  landmarks ledger --output s3://bucket/landmarks/                     # what the runs did
  ray job submit --working-dir . -- python jobs/nightly.py --input ... --output ...

Partitions: INPUT/date=YYYY-MM-DD/ -> OUTPUT/date=YYYY-MM-DD/, or the URIs with {date} filled
in. Only shards not yet done for the current model version and settings are processed: a
second run of the same night does nothing; a new model version redoes them.
Ledger: OUTPUT/_ledger/<start>-<id>.json, one record per run (read it with landmarks ledger).
Exit status: 0 every date ok or without input; 1 a date failed (see landmarks infer);
2 bad arguments or input (a missing input root is an error, a missing partition is not).
"""


def run_ledger(args: argparse.Namespace) -> int:
    options = resolve_storage_options(args.storage_options, [args.output])
    records = read_ledger(args.output, options)
    if args.last is not None:
        records = records[-args.last:] if args.last > 0 else []
    if args.json:
        print(json.dumps(records, indent=2))
    elif not records:
        print(f"no runs recorded in {ledger_dir(args.output)}")
    else:
        print(ledger_table(records))
    return 0



@dataclass(frozen=True)
class NightlyDates:
    """Which nights a run covers: per-run selections, never saved with the job's config."""

    date: str | None = option("the night to process (default: yesterday in UTC)", default=None,
                              parse=parse_date, metavar="YYYY-MM-DD", group="dates")
    since: str | None = option("also every existing input partition from this date to --date",
                               default=None, parse=parse_date, metavar="YYYY-MM-DD",
                               group="dates")
    lookback_days: int = option(
        "without --since: also the existing partitions of the N nights before --date; only "
        "their shards not done yet are processed, so a night that failed is finished by the "
        "next run", default=0, bounds=at_least(0), metavar="N", group="dates")


NIGHTLY_IO = {
    "input": {"required": True, "help": "root of the date=YYYY-MM-DD/ input partitions, or a "
              "URI with {date} (e.g. s3://bucket/incoming/{date}/)"},
    "output": {"required": True, "help": "root of the date=YYYY-MM-DD/ output partitions (and "
               "of _ledger/), or a URI with {date}"},
}


def run_nightly(args: argparse.Namespace) -> int:
    if not args.input or not args.output:
        raise BadInput("nightly needs --input and --output (roots of the date partitions, "
                         "or URIs with {date})")
    args.date = args.date or default_date()
    if args.since is not None and args.since > args.date:
        raise BadInput(f"--since {args.since} is after --date {args.date}")
    args.since = first_night(args.date, args.since, args.lookback_days)
    base = infer_config(args)  # checks the settings before anything is written
    announce_config(args, f"{root_of(args.output)}/{CONFIG_FILE}", base.storage_options,
                    leave_out=RUN_OPTIONS)
    with pushed_outcome(args, "landmarks_nightly", root_of(args.output)) as outcome:
        code = run_nights(Nights(args.input, args.output, args.date, args.since), base,
                          outcome)
        outcome.success = code == 0
    return code


def ledger_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True,
                   help="the nightly --output (a root or a URI with {date})")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--last", type=positive_int, metavar="N", help="only the last N runs")
    p.add_argument("--storage-options", type=storage_options_arg, default={},
                   help="fsspec options as JSON or @file.json (as for nightly)")


COMMANDS = {
    "nightly": Command(
        run_nightly, epilog=NIGHTLY_EPILOG,
        schema=(InferConfig, NightlyDates, PushOption),  # no --preview: see `infer`
        overrides=NIGHTLY_IO,
        description="Run the inference job on the date partitions of the input that have "
                    "shards not yet done for the current model and settings, and record the "
                    "run in the output's ledger."),
    "ledger": Command(
        run_ledger, arguments=ledger_arguments,
        description="Print the nightly runs recorded in OUTPUT/_ledger/, oldest first."),
}
