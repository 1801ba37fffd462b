"""``landmarks report``: rebuild a run's HTML page from what the run left in its output."""

from __future__ import annotations

import argparse

from pipeline.cli.common import Command
from pipeline.config.errors import BadInput
from pipeline.io.storage import resolve_storage_options, storage_options_arg

REPORT_EPILOG = """\
examples:
  landmarks report sample-data/landmarks                  # the latest run
  landmarks report s3://bucket/landmarks/ --run 20261204T172451Z-a44b8f
  landmarks report s3://bucket/landmarks/ --list          # the runs it can rebuild

Every run of landmarks infer (and of each nightly date) writes its page itself; this command
writes it again, e.g. after the page was deleted or to draw the preview from a moved input.
Exit status: 0 written; 2 no such output or run.
"""


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the --output of the run (folder/prefix at any fsspec URI)")
    p.add_argument("--run", dest="run_id", metavar="ID",
                   help="the run (default: the latest); see --list")
    p.add_argument("--list", action="store_true", help="list the runs with a manifest")
    p.add_argument("--storage-options", type=storage_options_arg, default={},
                   help="fsspec options as JSON or @file.json (as for infer)")


def run_report(args: argparse.Namespace) -> int:
    from pipeline.report.run import run_ids, write_run_report

    options = resolve_storage_options(args.storage_options, [args.output])
    runs = run_ids(args.output, options)
    if args.list:
        print("\n".join(runs) if runs else f"no runs recorded under {args.output}")
        return 0
    if args.run_id is not None and args.run_id not in runs:
        raise BadInput(f"no run {args.run_id!r} under {args.output}: "
                         + (f"its runs are {', '.join(runs[-10:])}" if runs else
                            "it has no run manifests (is it the --output of landmarks infer?)"))
    try:
        uri = write_run_report(args.output, args.run_id, options)
    except FileNotFoundError as exc:
        raise BadInput(f"no run manifest under {args.output} ({exc}): is it the --output "
                         "of landmarks infer?") from exc
    print(f"report: {uri}")
    return 0


COMMANDS = {
    "report": Command(
        run_report, arguments=report_arguments, epilog=REPORT_EPILOG,
        description="Write a run's HTML report, OUTPUT/_report/<run>.html, from its manifest, "
                    "receipts and output files."),
}
