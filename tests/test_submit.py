"""``landmarks submit`` against a real Ray head started on loopback by this module.

The head is its own Ray cluster (``ray start --head`` in a new process session, with its own
temp dir and ports), separate from the session's in-process ``ray_session``. ``ray stop`` would
stop every Ray on the machine, so the teardown kills only this head's processes: those of its
process group or naming its temp dir, and their descendants (workers, job drivers).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from pipeline.backend.jobs import connect
from pipeline.cli.registry import parse_args
from pipeline.ops.submit import ADDRESS_VARIABLES, EXCLUDES, PROJECT_ROOT

RAY = Path(sys.executable).parent / "ray"
pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                       reason="the head's teardown reads /proc (Linux)"),
    # Ray's own log-tail client (aiohttp) in Ray 2.60.
    pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, command line) of every live (not zombie) process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if fields[0] != "Z":
            found[int(entry.name)] = (int(fields[1]), int(fields[2]), cmdline)
    return found


def _head_pids(pgid: int, marker: str) -> set[int]:
    """The head's processes: its process group, any naming its temp dir, and descendants."""
    procs = _processes()
    pids = {pid for pid, (_, group, cmd) in procs.items() if group == pgid or marker in cmd}
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in procs.items():
        children.setdefault(parent, []).append(pid)
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in pids:
                pids.add(child)
                todo.append(child)
    pids.discard(os.getpid())
    return pids


def _stop_head(pgid: int, marker: str, grace: float = 5.0) -> None:
    """SIGTERM this head's processes, SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = _head_pids(pgid, marker)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids &= set(_processes())
        if not pids:
            return


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on loopback with the job API on http://127.0.0.1:<port>; stopped at the end."""
    # Unix socket paths in the temp dir must stay short (< 108 bytes).
    temp_dir = tempfile.mkdtemp(prefix="lmk-head-", dir="/tmp")
    dashboard_port = _free_port()
    url = f"http://127.0.0.1:{dashboard_port}"
    env = {k: v for k, v in os.environ.items() if k not in ADDRESS_VARIABLES}
    # The job's `python` is this venv's, as on a cluster node with the project's dependencies.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [
        str(RAY), "start", "--head", "--port", str(_free_port()),
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
        # Fixed defaults (10001, 52365) would collide with other Rays on this machine.
        "--ray-client-server-port", str(_free_port()),
        "--dashboard-agent-listen-port", str(_free_port()),
        "--num-cpus", "2", "--object-store-memory", str(512 << 20),
        "--temp-dir", temp_dir, "--disable-usage-stats",
    ]
    log = Path(temp_dir) / "ray-start.log"
    with log.open("w") as out:
        # A new session: `ray start` leads a process group that its daemons stay in.
        start = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
    pgid = start.pid
    try:
        if start.wait(timeout=180) != 0:
            pytest.fail(f"ray start failed:\n{log.read_text()[-4000:]}")
        deadline = time.monotonic() + 90
        while True:
            try:
                connect(url).list_jobs()
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    pytest.fail(f"the job API at {url} did not answer: {exc}")
                time.sleep(1)
        yield url
    finally:
        if start.poll() is None:
            start.kill()
        _stop_head(pgid, temp_dir)
        leftover = _head_pids(pgid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"head processes left running: {sorted(leftover)}"


@pytest.fixture
def submit(monkeypatch):
    """Run ``landmarks submit ARGV`` through the subcommand's own parser; returns the status."""
    for name in ADDRESS_VARIABLES:  # the environment's cluster must not leak in
        monkeypatch.delenv(name, raising=False)
    def run(*argv: str) -> int:
        args = parse_args(["submit", *argv])
        return args.run(args)

    return run


def test_submit_no_wait_with_job_id_and_env(ray_head, submit, tmp_path, capsys):
    job_id = f"lmk-test-{uuid.uuid4().hex[:8]}"
    code = submit("--address", ray_head, "--no-wait", "--job-id", job_id,
                  "--env", "LMK_SUBMIT_TEST=yes", "evaluate", "--labels", "/nonexistent/labels",
                  "--predictions", "/nonexistent/out", "--report", str(tmp_path / "r.json"))

    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    assert f"submitted job {job_id} to {ray_head}" in printed.out
    assert f"ray job stop {job_id} --address {ray_head}" in printed.out
    info = connect(ray_head).get_job_info(job_id)
    assert info.entrypoint.startswith("python jobs/evaluate.py --labels /nonexistent/labels")
    assert info.runtime_env["env_vars"]["LMK_SUBMIT_TEST"] == "yes"
    assert info.metadata == {"landmarks_job": "evaluate"}
    # (It fails soon after: no such labels. Not waited for; the teardown stops what is left.)
    # The same id again is refused by the cluster: not submitted, status 2.
    assert submit("--address", ray_head, "--no-wait", "--job-id", job_id, "evaluate",
                  "--labels", "x", "--predictions", "y", "--report", "z") == 2
    err = capsys.readouterr().err
    assert f"not submitted: ValueError: Job with submission_id {job_id} already exists" in err
    assert "Traceback" not in err


def test_submit_runs_inference_job_to_success(ray_head, submit, tmp_path, capsys):
    import pyarrow.parquet as pq

    from pipeline.demo.synthetic import write_sample_archive

    shards, out = tmp_path / "shards", tmp_path / "out"
    write_sample_archive(str(shards), 1, 2, seed=0, image_size=(160, 120))

    code = submit("--address", ray_head, "--follow", "infer", "--input", str(shards),
                  "--output", str(out), "--batch-size", "2")

    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    assert f"to {ray_head}: python jobs/infer.py --input {shards}" in printed.out
    assert "submitted job raysubmit_" in printed.out
    # The job's own log line, streamed by --follow, once (the catch-up adds nothing twice).
    assert printed.out.count("summary: 2 samples") == 1
    assert "SUCCEEDED" in printed.out
    parts = sorted(out.glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-faces-00000.parquet"]
    table = pq.read_table(parts[0])
    assert table.num_rows == 2
    assert table.column("error").null_count == 2


def test_submit_reports_failing_job(ray_head, submit, tmp_path, capsys):
    code = submit("--address", ray_head, "infer", "--input", "/nonexistent/shards",
                  "--output", str(tmp_path / "out"))

    printed = capsys.readouterr()
    assert code == 1, printed.out + printed.err
    assert "submitted job raysubmit_" in printed.out
    assert "FAILED" in printed.out
    assert "last 20 lines of its logs" in printed.err
    assert "/nonexistent/shards" in printed.err  # the job's own error message, from its logs
    assert "ray job logs raysubmit_" in printed.err


@pytest.mark.parametrize("argv", [
    ["infer", "--input", "x", "--output", "y", "--batch-sise", "2"],  # the job's parser refuses
    ["finetune", "--input", "x"],                                       # required options missing
    ["infer", "--batch-size", "many"],
])
def test_submit_refuses_bad_job_args_locally(submit, argv, capsys):
    # Nobody listens on this address: a 2 here means nothing was sent.
    assert submit("--address", f"http://127.0.0.1:{_free_port()}", *argv) == 2
    assert "submitted" not in capsys.readouterr().out


def test_submit_refuses_unknown_job(submit, capsys):
    with pytest.raises(SystemExit) as exc:
        submit("--address", "http://127.0.0.1:1", "train-everything", "--fast")
    assert exc.value.code == 2
    assert "invalid choice: 'train-everything'" in capsys.readouterr().err


def test_submit_refuses_bad_config_locally(submit, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("batch_sise: 2\n")
    argv = ["infer", "--config", str(config), "--input", "x", "--output", "y"]
    assert submit("--address", f"http://127.0.0.1:{_free_port()}", *argv) == 2
    assert "batch_sise" in capsys.readouterr().err


def test_submit_refuses_inline_storage_secrets_and_never_shows_them(submit, tmp_path, capsys):
    """Inline storage options would sit in the entrypoint (Ray keeps and shows it) and in the
    printed command: refused before anything is sent, and the secret is not echoed. A reference
    (@file read on the cluster) passes."""
    secret = "planted-submit-secret-91d2"
    inline = json.dumps({"s3": {"key": "AKIA-PLANTED", "secret": secret}})
    config = tmp_path / "job.yaml"
    config.write_text(f"storage_options:\n  s3: {{secret: {secret}}}\n")
    address = f"http://127.0.0.1:{_free_port()}"
    for argv in (["--storage-options", inline], [f"--storage-options={inline}"],
                 ["--config", str(config)]):
        assert submit("--address", address, "infer", "--input", "s3://b/in", "--output",
                      "s3://b/out", *argv) == 2
        printed = capsys.readouterr()
        assert "pass them by reference, --storage-options @" in printed.err
        assert secret not in printed.out + printed.err and "submitted" not in printed.out
    by_reference = tmp_path / "s3.json"
    by_reference.write_text(inline)
    code = submit("--address", address, "infer", "--input", "s3://b/in", "--output", "s3://b/out",
                  "--storage-options", f"@{by_reference}")
    printed = capsys.readouterr()
    assert code == 2 and "cannot reach the Ray job API" in printed.err  # checked, then sent
    assert secret not in printed.out + printed.err


def test_config_warning_for_paths_the_cluster_cannot_see(tmp_path, monkeypatch):
    from pipeline.ops.submit import config_warning

    monkeypatch.chdir(PROJECT_ROOT)
    assert config_warning(["--config", "deploy/configs/x.yaml"], PROJECT_ROOT) is None
    assert config_warning(["--config=s3://bucket/x.yaml"], PROJECT_ROOT) is None
    assert config_warning(["--input", "x"], PROJECT_ROOT) is None
    assert "relative to that folder" in config_warning(
        ["--config", str(tmp_path / "x.yaml")], PROJECT_ROOT)
    monkeypatch.chdir(tmp_path)
    assert config_warning(["--config", "x.yaml"], PROJECT_ROOT) is not None


def test_submit_needs_an_address(submit, capsys):
    assert submit("infer", "--input", "x", "--output", "y") == 2
    assert "RAY_ADDRESS" in capsys.readouterr().err


@pytest.mark.parametrize("variable", ADDRESS_VARIABLES)
def test_submit_unreachable_cluster(submit, capsys, monkeypatch, variable):
    address = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv(variable, address)
    assert submit("infer", "--input", "x", "--output", "y") == 2
    assert f"cannot reach the Ray job API at {address}" in capsys.readouterr().err


class FakeClient:
    """The JobSubmissionClient calls run_submit makes, scripted."""

    _address = "http://fake-head:8265"

    def __init__(self, statuses, logs="", stream=(), stream_error=None):
        from ray.job_submission import JobStatus

        self.statuses = [JobStatus(s) for s in statuses]
        self.logs, self.stream, self.stream_error = logs, stream, stream_error

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return "raysubmit_fake"

    def get_job_status(self, job_id):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(status, BaseException):
            raise status
        return status

    def get_job_logs(self, job_id):
        return self.logs

    async def tail_job_logs(self, job_id):
        for chunk in self.stream:
            yield chunk
        if self.stream_error:
            raise self.stream_error


def test_follow_falls_back_to_polling_when_the_stream_breaks(submit, monkeypatch, capsys):
    fake = FakeClient(["RUNNING", "SUCCEEDED"], logs="line 1\nline 2\nline 3\n",
                      stream=["line 1\n"], stream_error=RuntimeError("WebSocket closed"))
    monkeypatch.setattr("pipeline.cli.submit.connect", lambda address: fake)
    code = submit("--address", "http://fake-head:8265", "--follow", "--poll", "0.01",
                  "infer", "--input", "x", "--output", "y")
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "submitted job raysubmit_fake to http://fake-head:8265" in printed.out
    assert printed.out.count("line 1") == printed.out.count("line 3") == 1
    assert "polling the logs instead" in printed.err
    assert fake.submitted["entrypoint"] == "python jobs/infer.py --input x --output y"
    assert fake.submitted["runtime_env"]["working_dir"] == str(PROJECT_ROOT)


def test_ctrl_c_while_waiting_leaves_the_job_running(submit, monkeypatch, capsys):
    fake = FakeClient(["RUNNING"])
    fake.statuses = [fake.statuses[0], KeyboardInterrupt()]
    monkeypatch.setattr("pipeline.cli.submit.connect", lambda address: fake)
    code = submit("--address", "http://fake-head:8265", "--poll", "0.01", "infer",
                  "--input", "x", "--output", "y")
    err = capsys.readouterr().err
    assert code == 130
    assert "job raysubmit_fake keeps running" in err
    assert "ray job stop raysubmit_fake --address http://fake-head:8265" in err


def test_submit_job_args_pass_through_and_env(submit):
    from pipeline.ops.submit import entrypoint, job_env

    assert entrypoint("python", "infer", ["--input", "a b", "--force"]) == (
        "python jobs/infer.py --input 'a b' --force")
    env = job_env(["A=1", "B=x=y"])
    assert env["A"] == "1" and env["B"] == "x=y" and env["PYTHONUNBUFFERED"] == "1"
    with pytest.raises(ValueError, match="not set"):
        job_env(["LMK_SURELY_UNSET_VARIABLE"])


def test_working_dir_upload_is_small_and_excludes_local_state(tmp_path):
    """Ray's own packaging of the working dir with our excludes (ignoring .gitignore, so the
    excludes stand alone): the code is in, the virtualenv, Git data and caches are not."""
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "pkg.zip"
    create_package(str(PROJECT_ROOT), package, include_gitignore=False, excludes=EXCLUDES)
    names = zipfile.ZipFile(package).namelist()
    assert "jobs/infer.py" in names and "pipeline/ops/submit.py" in names
    assert "pyproject.toml" in names
    for part in (".venv/", ".git/", "sample-data/", "benchmark-results/", "__pycache__/",
                 ".egg-info/", ".pytest_cache/", ".ruff_cache/"):
        assert not [n for n in names if part in n], part
    assert package.stat().st_size < 20 << 20, package.stat().st_size
