"""``landmarks submit``: send a job to a Ray cluster through the Ray Jobs API.

    landmarks submit --address http://HEAD:8265 --follow infer --input s3://... --output ...

The job's own arguments are checked here first, with the job's own parser, so a typo fails on
the laptop and not on the cluster. The project folder (without the virtualenv, Git data, caches
and sample data) becomes the job's working directory (``runtime_env.working_dir``) and the job
runs ``python jobs/<job>.py ARGS`` there, so paths in ARGS are as the cluster sees them. The
command prints the job id, waits for the job (``--follow`` streams its logs; ``--no-wait``
returns at once) and exits 0 when it succeeded, 1 when it failed or was stopped, 2 for bad
arguments or a cluster it cannot reach.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

# JOB -> its entrypoint script, relative to the working directory.
JOBS = {
    "infer": "jobs/infer.py",
    "finetune": "jobs/finetune.py",
    "evaluate": "jobs/evaluate.py",
    "nightly": "jobs/nightly.py",
}
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Left out of the upload (gitignore patterns, relative to the working directory; "/x/" only at
# its top). Ray also honours .gitignore and .rayignore; these hold even without them. The
# upload is about 1 MB; Ray refuses packages over 500 MiB.
EXCLUDES = [
    ".git/", ".venv/", "/venv/", "/env/", "/sample-data/", "/benchmark-results/", "/.whl/",
    "*.whl", "/build/", "/dist/", "*.egg-info/", "__pycache__/", "*.pyc", ".pytest_cache/",
    ".ruff_cache/", ".mypy_cache/", ".ipynb_checkpoints/", ".DS_Store",
]
# Where the job API's address comes from without --address, as in `ray job submit`.
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# Set for every job: unbuffered output, so --follow shows log lines as they are written.
DEFAULT_ENV = {"PYTHONUNBUFFERED": "1"}
FAILED_LOG_LINES = 20

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


def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    """The ``submit`` subcommand (``set_defaults(run=run_submit)``)."""
    p = subparsers.add_parser(
        "submit",
        help="submit a job to a Ray cluster (Ray Jobs API) and wait for it",
        epilog=SUBMIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Send the inference, fine-tuning, evaluation or nightly job to a Ray "
        "cluster with the project as its working directory, print the job id and wait for it.",
    )
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
    p.set_defaults(run=run_submit)
    return p


def validate_job_args(job: str, job_args: list[str]) -> None:
    """Parse ``JOB ARGS`` with the job's own parser, ``--config FILE`` applied; argparse exits
    (2) on an error, a bad config raises ``ConfigError``."""
    from pipeline.cli import main as cli  # here: pipeline.cli.main mounts this module

    cli.parse_args([job, *job_args])


def config_warning(job_args: list[str], working_dir: Path) -> str | None:
    """A warning when a local ``--config FILE`` would not be the same file on the cluster.

    The job reads it there, relative to the uploaded working directory; so a local config must
    be given relative to the working directory, from the working directory.
    """
    path = None
    for i, arg in enumerate(job_args):
        if arg == "--config" and i + 1 < len(job_args):
            path = job_args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if not path or "://" in path:
        return None
    if not Path(path).is_absolute() and (working_dir / path).resolve() == Path(path).resolve():
        return None
    return (f"warning: --config {path} is read on the cluster, in the uploaded copy of "
            f"{working_dir}: give it relative to that folder (and run from there), or as an "
            "s3:// / gs:// URI")


def job_env(items: list[str]) -> dict[str, str]:
    """``--env`` items (``KEY=VALUE``, or ``KEY`` for this shell's value) over DEFAULT_ENV."""
    env = dict(DEFAULT_ENV)
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE or KEY")
        if not sep:
            if key not in os.environ:
                raise ValueError(f"--env {key}: not set in this shell (use {key}=VALUE)")
            value = os.environ[key]
        env[key] = value
    return env


def build_runtime_env(working_dir: Path, env: dict[str, str],
                      pip: list[str] | None = None) -> dict[str, Any]:
    """The job's runtime_env: the working directory to upload, its excludes, env vars, pip."""
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": env}
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def entrypoint(python: str, job: str, job_args: list[str]) -> str:
    """The shell command the cluster runs in the working directory."""
    return shlex.join([python, JOBS[job], *job_args])


class _KnownExcludesNotice(logging.Filter):
    """Drops Ray's notice that .git / .venv are now left out of uploads: EXCLUDES does that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is now ignored by default" not in record.getMessage()


def _quiet_ray_upload_notices() -> None:
    log = logging.getLogger("ray._private.runtime_env.working_dir")
    if not any(isinstance(f, _KnownExcludesNotice) for f in log.filters):
        log.addFilter(_KnownExcludesNotice())


def _local_token_headers() -> dict[str, str]:
    """The Authorization header for this machine's Ray token (~/.ray/auth_token,
    RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH), or {} when there is none."""
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication
        return {}
    try:
        loader = AuthenticationTokenLoader.instance()
        if loader.has_token(ignore_auth_mode=True):
            return dict(loader.get_token_for_http_header())
    except Exception:  # no usable token: go on without one
        pass
    return {}


def connect(address: str):
    """A JobSubmissionClient for ``address``.

    Recent Ray clusters may require a token (Ray 2.60's ``ray start`` turns it on when
    ~/.ray/auth_token exists). The SDK only sends it when RAY_AUTH_MODE=token is set here, so
    when the server asks for one and the mode is not set, the local token is sent, as
    ``ray.init`` does when it joins a cluster.
    """
    import ray.exceptions
    from ray.job_submission import JobSubmissionClient

    auth_error = getattr(ray.exceptions, "AuthenticationError", None)  # not in older Ray
    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        if auth_error is None or not isinstance(exc, auth_error) or "RAY_AUTH_MODE" in os.environ:
            raise
        headers = _local_token_headers()
        if not headers:
            raise
        return JobSubmissionClient(address, headers=headers)


def short_error(exc: BaseException) -> str:
    """The message of an SDK error; for a server-side traceback, its last ``Error:`` line."""
    text = str(exc).strip()
    if "Traceback (most recent call last)" not in text:
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip().strip(".")]
    errors = [line for line in lines if ": " in line and line.split(": ", 1)[0].endswith(
        ("Error", "Exception"))]
    return (errors or lines or [text])[-1]


def _log_tail(text: str, lines: int = FAILED_LOG_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


async def _stream_logs(client, job_id: str, out, state: dict[str, int]) -> None:
    """Print the job's log chunks as they come, counting the characters printed."""
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
        state["printed"] += len(chunk)


def follow_logs(client, job_id: str, poll: float, out=None) -> None:
    """Print the job's logs until it ends.

    They come from the job server's websocket stream (what ``ray job logs --follow`` uses);
    should that fail or close early (a proxy without websockets, a dropped connection), the
    whole log is polled and its unseen part printed, which also catches up at the end.
    """
    out = out or sys.stdout
    state = {"printed": 0}
    try:
        asyncio.run(_stream_logs(client, job_id, out, state))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # fall back to polling
        print(f"\n(log stream broke off: {short_error(exc)}; polling the logs instead)",
              file=sys.stderr)
    while True:
        done = client.get_job_status(job_id).is_terminal()
        logs = client.get_job_logs(job_id)
        if len(logs) > state["printed"]:
            out.write(logs[state["printed"]:])
            out.flush()
            state["printed"] = len(logs)
        if done:
            return
        time.sleep(poll)


def wait_for_job(client, job_id: str, poll: float) -> Any:
    """Poll until the job reaches a terminal status; print each change. Returns the status."""
    last = None
    delay = poll
    while True:
        status = client.get_job_status(job_id)
        if status != last:
            print(f"job {job_id}: {status}", flush=True)
            last = status
        if status.is_terminal():
            return status
        time.sleep(delay)
        delay = min(delay * 1.5, max(poll, 5.0))  # long jobs: a poll every 5 s


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
    except (ValueError, FileNotFoundError) as exc:  # a bad --config file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warning = config_warning(job_args, working_dir)
    if warning:
        print(warning, file=sys.stderr)
    try:
        runtime_env = build_runtime_env(working_dir, job_env(args.env), args.pip)
    except ValueError as exc:
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
    _quiet_ray_upload_notices()
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
        tail = _log_tail(client.get_job_logs(job_id))
        if tail:
            print(f"last {FAILED_LOG_LINES} lines of its logs:\n{tail}", file=sys.stderr)
    print(f"  logs: ray job logs {job_id} {hint}", file=sys.stderr, flush=True)
    return 1
