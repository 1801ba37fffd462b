"""``landmarks submit``: send a job to a Ray cluster through the Ray Jobs API.

    landmarks submit --address http://HEAD:8265 --follow infer --input s3://... --output ...

The job's own arguments are checked first, by the registry with the job's own parser, so a typo
fails on the laptop and not on the cluster (``pipeline.ops.submit`` says what is uploaded and
run; ``pipeline.backend.jobs`` talks to the cluster).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from pipeline.backend.jobs import connect, quiet_upload_notices
from pipeline.cli.common import Command
from pipeline.cli.registry import parse_args
from pipeline.config.errors import BadInput
from pipeline.ops.submit import (
    ADDRESS_VARIABLES,
    FAILED_LOG_LINES,
    JOBS,
    PROJECT_ROOT,
    build_runtime_env,
    config_warning,
    entrypoint,
    follow_logs,
    job_env,
    log_tail,
    short_error,
    wait_for_job,
)

SUBMIT_EPILOG = """\
examples:
  landmarks submit --address http://head:8265 infer --input s3://b/shards/ --output s3://b/out/
  RAY_ADDRESS=http://head:8265 landmarks submit --follow finetune --input s3://b/labelled/ \\
      --storage-path s3://b/runs --name v3 --num-workers 4
  landmarks submit --no-wait --env AWS_ENDPOINT_URL --pip s3fs infer --input ... --output ...

The job's arguments are checked locally before anything is sent; paths in them are read on the
cluster. Exit status: 0 the job succeeded (or was submitted, with --no-wait); 1 it failed or was
stopped; 2 bad arguments or the cluster could not be reached.
"""


def submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the cluster's dashboard / job API, e.g. "
                   "http://head:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)")
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--follow", action="store_true", help="stream the job's logs while waiting")
    wait.add_argument("--no-wait", action="store_true",
                      help="return as soon as the job is submitted")
    p.add_argument("--job-id", help="submission id (default: one Ray makes, raysubmit_...)")
    p.add_argument("--working-dir", type=Path, default=PROJECT_ROOT,
                   help="folder uploaded as the job's working directory (default: this project, "
                        f"{PROJECT_ROOT})")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="environment variable for the job; KEY alone passes this shell's value "
                        "(repeatable; nothing is passed through by default)")
    p.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                   help="extra pip package installed for the job, e.g. s3fs (repeatable)")
    p.add_argument("--python", default="python",
                   help="interpreter of the entrypoint on the cluster (default: python)")
    p.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)  # status poll, s
    p.add_argument("job", choices=sorted(JOBS), help="the job to run")
    p.add_argument("job_args", nargs=argparse.REMAINDER, metavar="JOB ARGS",
                   help="the job's own arguments (see landmarks JOB --help)")


INLINE_SECRETS = (
    "inline storage options would be stored in plain text in the Ray job's entrypoint (or in "
    "the config uploaded with it) and printed: pass them by reference, --storage-options "
    "@/path/on/the/cluster.json (a file the job reads there), or give the cluster the "
    "credentials as environment variables (AWS_ACCESS_KEY_ID, ..., e.g. from a Kubernetes "
    "Secret)")


def validate_job_args(job: str, job_args: list[str]) -> argparse.Namespace:
    """Parse ``JOB ARGS`` with the job's own parser, ``--config FILE`` applied; argparse exits
    (2) on an error, a bad config raises ``ConfigError``, and inline storage options (secrets
    in the entrypoint) a ``ValueError``."""
    parsed = parse_args([job, *job_args])
    if getattr(parsed, "storage_options", None) and not parsed.storage_reference:
        raise BadInput(INLINE_SECRETS)
    return parsed


def run_submit(args: argparse.Namespace) -> int:
    job_args = list(args.job_args)
    if job_args[:1] == ["--"]:
        job_args = job_args[1:]
    address = args.address or next(
        (os.environ[name] for name in ADDRESS_VARIABLES if os.environ.get(name)), None)
    if not address:
        print("error: no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
              "(or RAY_API_SERVER_ADDRESS) to the cluster's dashboard / job API",
              file=sys.stderr)
        return 2
    working_dir = args.working_dir.expanduser().resolve()
    script = working_dir / JOBS[args.job]
    if not script.is_file():
        print(f"error: {script} not found: --working-dir must hold the project "
              f"({JOBS[args.job]})", file=sys.stderr)
        return 2
    try:
        validate_job_args(args.job, job_args)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0); nothing was sent
        return exc.code if isinstance(exc.code, int) else 2
    except (BadInput, FileNotFoundError) as exc:  # a bad --config file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warning = config_warning(job_args, working_dir)
    if warning:
        print(warning, file=sys.stderr)
    try:
        runtime_env = build_runtime_env(working_dir, job_env(args.env), args.pip)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        client = connect(address)
    except Exception as exc:  # connection refused, bad URL, auth, old server
        print(f"error: cannot reach the Ray job API at {address}: {short_error(exc)}",
              file=sys.stderr)
        return 2
    url = getattr(client, "_address", address)
    command = entrypoint(args.python, args.job, job_args)
    quiet_upload_notices()
    try:
        job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env,
                                   submission_id=args.job_id,
                                   metadata={"landmarks_job": args.job})
    except Exception as exc:  # id taken, upload too large, server error
        print(f"error: the job was not submitted: {short_error(exc)}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id} to {url}: {command}", flush=True)
    hint = f"--address {shlex.quote(url)}"
    if args.no_wait:
        print(f"  logs: ray job logs --follow {job_id} {hint}\n"
              f"  stop: ray job stop {job_id} {hint}", flush=True)
        return 0

    try:
        if args.follow:
            follow_logs(client, job_id, args.poll)
        status = wait_for_job(client, job_id, args.poll)
    except KeyboardInterrupt:
        print(f"\ninterrupted: job {job_id} keeps running on the cluster.\n"
              f"  follow it: ray job logs --follow {job_id} {hint}\n"
              f"  stop it:   ray job stop {job_id} {hint}", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # the job server went away while we waited
        print(f"error: lost contact with the job server while waiting ({short_error(exc)}); "
              f"job {job_id} may still be running: ray job status {job_id} {hint}",
              file=sys.stderr)
        return 1
    if status.value == "SUCCEEDED":
        return 0
    info = client.get_job_info(job_id)
    message = (info.message or "").strip()
    if message:  # for a failed entrypoint: "... exit code N, last available logs ...: <logs>"
        reason = message.splitlines()[0].split(", last available logs")[0].rstrip(":")
        print(f"job {job_id} {status.value}: {reason}", file=sys.stderr)
    if not args.follow:
        tail = log_tail(client.get_job_logs(job_id))
        if tail:
            print(f"last {FAILED_LOG_LINES} lines of its logs:\n{tail}", file=sys.stderr)
    print(f"  logs: ray job logs {job_id} {hint}", file=sys.stderr, flush=True)
    return 1


COMMANDS = {
    "submit": Command(
        run_submit, arguments=submit_arguments, epilog=SUBMIT_EPILOG,
        description="Send the inference, fine-tuning, evaluation or nightly job to a Ray "
                    "cluster with the project as its working directory, print the job id and "
                    "wait for it."),
}
