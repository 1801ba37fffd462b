"""What ``landmarks submit`` sends to a Ray cluster, and how it waits (free of Ray: the client
is ``pipeline.backend.jobs``, the command ``pipeline.cli.submit``).

The project folder (without the virtualenv, Git data, caches and sample data) becomes the job's
working directory (``runtime_env.working_dir``) and the job runs ``python jobs/<job>.py ARGS``
there, so paths in ARGS are as the cluster sees them. The command prints the job id, waits for the
job (``--follow`` streams its logs; ``--no-wait`` returns at once) and exits 0 when it succeeded, 1
when it failed or was stopped, 2 for bad arguments or a cluster it cannot reach.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config.errors import BadInput

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
            raise BadInput(f"--env {item!r}: expected KEY=VALUE or KEY")
        if not sep:
            if key not in os.environ:
                raise BadInput(f"--env {key}: not set in this shell (use {key}=VALUE)")
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


def short_error(exc: BaseException) -> str:
    """The message of an SDK error; for a server-side traceback, its last ``Error:`` line."""
    text = str(exc).strip()
    if "Traceback (most recent call last)" not in text:
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip().strip(".")]
    errors = [line for line in lines if ": " in line and line.split(": ", 1)[0].endswith(
        ("Error", "Exception"))]
    return (errors or lines or [text])[-1]


def log_tail(text: str, lines: int = FAILED_LOG_LINES) -> str:
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
