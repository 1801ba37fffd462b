"""One run at a time per output: the lease (Ray-free), and two real runs on one output."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import pytest

from pipeline.io import lease as lease_module
from pipeline.io.lease import LEASE_FILE, Lease, LeaseHeld, LeaseLost


def _plant(output, run_id, heartbeat_age_s, host="gpu-node-7", **identity):
    output.mkdir(parents=True, exist_ok=True)
    (output / LEASE_FILE).write_text(json.dumps({
        "run_id": run_id, "token": f"token-of-{run_id}", "host": host, "pid": 4242,
        "started": "2026-11-27T01:00:00+00:00", "beat": 1,
        "heartbeat": time.time() - heartbeat_age_s, **identity}))


def test_a_live_runs_lease_refuses_a_second_run_and_names_it(tmp_path):
    out = tmp_path / "out"
    _plant(out, "20261127T010000Z-aaaaaa", heartbeat_age_s=20)
    with pytest.raises(LeaseHeld) as held:
        Lease(str(out), "20261127T020000Z-bbbbbb").acquire()
    message = str(held.value)
    assert f"{out} is being written by run 20261127T010000Z-aaaaaa on host gpu-node-7" in message
    assert "pid 4242" in message and "last heartbeat 20 s ago" in message
    assert "rerun with --break-lease" in message
    assert json.loads((out / LEASE_FILE).read_text())["run_id"] == "20261127T010000Z-aaaaaa"


def test_an_expired_lease_is_taken_over_and_break_lease_takes_a_live_one(tmp_path, caplog):
    out = tmp_path / "out"
    _plant(out, "dead-run", heartbeat_age_s=lease_module.EXPIRES_S + 5)
    # Another machine's lease: watched for two (short) heartbeats without a beat first.
    with caplog.at_level(logging.WARNING, "pipeline"), \
            Lease(str(out), "new-run", heartbeat_s=0.05) as lease:
        assert json.loads((out / LEASE_FILE).read_text())["run_id"] == "new-run"
        lease.check()
    assert "taking over the output's lease from run dead-run" in caplog.text
    assert "its heartbeat expired" in caplog.text
    assert not (out / LEASE_FILE).exists()  # released

    _plant(out, "live-run", heartbeat_age_s=1)
    with Lease(str(out), "breaker", break_lease=True):
        assert json.loads((out / LEASE_FILE).read_text())["run_id"] == "breaker"

    # A killed run on this host (its process is gone): taken over at once, no waiting.
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant(out, "killed-run", heartbeat_age_s=1, **lease_module.machine())
    lease = json.loads((out / LEASE_FILE).read_text())
    (out / LEASE_FILE).write_text(json.dumps({**lease, "pid": dead.pid}))
    with caplog.at_level(logging.WARNING, "pipeline"), Lease(str(out), "rerun"):
        assert json.loads((out / LEASE_FILE).read_text())["run_id"] == "rerun"
    assert "its process on this host is gone" in caplog.text


def test_the_heartbeat_renews_the_lease_and_notices_a_takeover(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = Lease(str(out), "holder", heartbeat_s=0.05)
    holder.acquire()
    try:
        first = json.loads((out / LEASE_FILE).read_text())["heartbeat"]
        deadline = time.time() + 5
        while (json.loads((out / LEASE_FILE).read_text())["heartbeat"] == first
               and time.time() < deadline):
            time.sleep(0.02)
        assert json.loads((out / LEASE_FILE).read_text())["heartbeat"] > first  # renewed
        holder.check()
        _plant(out, "thief", heartbeat_age_s=0)  # another run broke the lease
        deadline = time.time() + 5
        while holder.lost is None and time.time() < deadline:
            time.sleep(0.02)
        with pytest.raises(LeaseLost, match="another run took over this output's lease: run "
                                            "thief"):
            holder.check()
    finally:
        holder.release()
    assert json.loads((out / LEASE_FILE).read_text())["run_id"] == "thief"  # theirs stays


def test_a_pid_from_another_pid_namespace_or_machine_is_not_a_dead_process(tmp_path):
    """hostNetwork pods share the host name and reuse each other's pids: a live run in another
    pod once lost its lease to a rerun that found "its" pid gone (issue 21)."""
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    here = lease_module.machine()
    for other in ({"pid_ns": "pid:[1]"}, {"boot_id": "another-machine"}):
        _plant(out, "pod-b-run", heartbeat_age_s=1, **{**here, **other})
        planted = json.loads((out / LEASE_FILE).read_text())
        (out / LEASE_FILE).write_text(json.dumps({**planted, "pid": dead.pid}))
        with pytest.raises(LeaseHeld, match="is being written by run pod-b-run"):
            Lease(str(out), "rerun", heartbeat_s=0.05).acquire()


def test_a_live_lease_from_a_host_whose_clock_is_behind_is_not_taken(tmp_path):
    """Its heartbeat reads 10 minutes old by this clock, yet it beats: clock skew, not death."""
    out = tmp_path / "out"
    _plant(out, "skewed-run", heartbeat_age_s=600, host="node-with-a-slow-clock",
           boot_id="another-machine")
    stop = threading.Event()

    def beat():  # the other host's heartbeat thread, with its clock 10 minutes behind
        n = 1
        while not stop.wait(0.02):
            n += 1
            record = json.loads((out / LEASE_FILE).read_text())
            (out / LEASE_FILE).write_text(json.dumps({**record, "beat": n,
                                                      "heartbeat": time.time() - 600}))

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(LeaseHeld, match="is being written by run skewed-run"):
            Lease(str(out), "rerun", heartbeat_s=0.1).acquire()
    finally:
        stop.set()
        thread.join()
    assert json.loads((out / LEASE_FILE).read_text())["run_id"] == "skewed-run"


def test_a_commit_writes_no_record_once_the_lease_is_another_run_s(tmp_path):
    """Fencing: whatever the heartbeat thread knows, the commit itself checks the token."""
    import numpy as np

    from pipeline.demo.synthetic import write_sample_archive
    from pipeline.io.shards import list_shards
    from pipeline.stages.commit import CommitSettings, commit_piece
    from pipeline.stages.reader import ShardReader

    write_sample_archive(str(tmp_path / "in"), num_shards=1, samples_per_shard=1,
                         image_size=(32, 32))
    shard = list_shards(str(tmp_path / "in"))[0]
    rows = next(ShardReader().read(shard))
    rows = {k: v for k, v in rows.items() if k != "pixels"}
    rows["landmarks"] = np.zeros((1, 68, 2), np.float32)
    rows["model_version"] = np.array(["v"], dtype=object)
    out = tmp_path / "out"
    with Lease(str(out), "mine", heartbeat_s=3600) as lease:
        settings = CommitSettings(str(out), "v", "s", 10_000, lease_token=lease.token)
        commit_piece(settings.spec(shard, 0, True), rows)  # holds: committed
        assert (out / "_done" / f"{shard.name}.json").exists()
        (out / "_done" / f"{shard.name}.json").unlink()
        _plant(out, "thief", heartbeat_age_s=0)  # taken over between two heartbeats
        with pytest.raises(LeaseLost, match="held by run thief"):
            commit_piece(settings.spec(shard, 0, True), rows)
        assert not (out / "_done" / f"{shard.name}.json").exists()


class SlowPredictor:
    """Three seconds a unit: long enough for a second run to try the same output."""

    def __init__(self, settings=None, weights_data=None):  # as LandmarkPredictor
        pass

    def __call__(self, rows):
        import numpy as np

        time.sleep(3)
        n = len(rows["key"])
        out = {k: v for k, v in rows.items() if k != "pixels"}
        out["landmarks"] = np.zeros((n, 68, 2), dtype=np.float32)
        out["model_version"] = np.full(n, "slow", dtype=object)
        return out


def test_two_concurrent_runs_on_one_output(ray_session, tmp_path, capsys):
    """Run A holds the output; run B, started while A works, stops with exit 2 naming A and
    touches nothing; after A ends (lease released), B runs and resumes from A's files."""
    import ray.cloudpickle

    from pipeline.cli.main import main
    from pipeline.demo.synthetic import write_sample_archive
    from pipeline.inference.config import InferConfig
    from pipeline.inference.job import run_inference

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    write_sample_archive(str(tmp_path / "in"), 2, 2, image_size=(32, 32), seed=1)
    out = tmp_path / "out"
    cfg = InferConfig(input=str(tmp_path / "in"), output=str(out), batch_size=2, unit_rows=2,
                      device="cpu")
    result = {}
    first = threading.Thread(target=lambda: result.update(
        a=run_inference(cfg, predictor=SlowPredictor)))
    first.start()
    deadline = time.time() + 60
    while not (out / LEASE_FILE).exists() and time.time() < deadline:
        time.sleep(0.05)
    holder = json.loads((out / LEASE_FILE).read_text())["run_id"]
    before = sorted(p.name for p in out.iterdir())
    code = main(["infer", "--input", str(tmp_path / "in"), "--output", str(out), "--device",
                 "cpu", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 2 and f"is being written by run {holder} on host" in err, err
    assert first.is_alive(), "run A ended before run B tried: the test proved nothing"
    assert sorted(p.name for p in out.iterdir()) == before  # B wrote nothing (no _config.yaml)
    first.join(120)
    assert result["a"].files_committed == 2 and not (out / LEASE_FILE).exists()


@pytest.fixture(scope="module")
def s3_output():
    """An empty bucket on moto's S3 server (loopback): (output URI, storage options)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="lease-bucket")
    yield "s3://lease-bucket", {"key": "testing", "secret": "testing", "endpoint_url": url,
                                "client_kwargs": {"region_name": "us-east-1"}}
    server.stop()


@pytest.mark.parametrize("store", ["local", "s3"])
def test_two_runs_taking_a_free_lease_at_once_get_one_holder(tmp_path, s3_output, store):
    """Conditional writes (issue 21): run A reads "no lease", and before its write lands run B
    takes the lease whole. Write-wait-read-back let A's later write win over B's lease while B,
    already past its check, ran on: two holders. Now A's write is conditional on "still no
    lease" (S3 If-None-Match; locally under a flock): A is refused, B keeps the lease."""
    if store == "s3":
        output, options = f"{s3_output[0]}/{tmp_path.name}", s3_output[1]
    else:
        output, options = str(tmp_path / "out"), None
    a = Lease(output, "run-a", options, settle_s=0.0)
    b = Lease(output, "run-b", options, settle_s=0.0)
    reads = {"n": 0}

    def racing(method):
        def call(*args, **kwargs):
            found = method(*args, **kwargs)
            reads["n"] += 1
            if reads["n"] == 1:  # A has read "no lease": B takes it now, whole
                b.acquire()
            return found
        return call

    a.read = racing(a.read)
    if hasattr(a, "_read_tagged"):  # (how this release reads; the old one read with read())
        a._read_tagged = racing(a._read_tagged)
    try:
        with pytest.raises(LeaseHeld, match="taken at the same moment by run run-b"):
            a.acquire()
        assert a.read()["token"] == b.token  # B's record, untouched
        b.check_token()  # B still holds it: its commits go on
        with pytest.raises(LeaseLost):
            a.check_token()
    finally:
        b.release()


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_renewal_never_overwrites_a_lease_taken_since_it_was_read(tmp_path, s3_output, store):
    """A heartbeat writes only over the version it read (S3 If-Match ETag): a run whose lease
    was taken over between its read and its write leaves the new holder's record alone."""
    if store == "s3":
        output, options = f"{s3_output[0]}/{tmp_path.name}", s3_output[1]
    else:
        output, options = str(tmp_path / "out"), None
    a = Lease(output, "run-a", options, settle_s=0.0)
    a.acquire()
    _, seen = a._read_tagged()
    b = Lease(output, "run-b", options, settle_s=0.0, break_lease=True)
    b.acquire()
    try:
        assert a._write_over(seen) is False
        assert a.read()["token"] == b.token
        assert a._write_over(None) is False  # "only where none is": there is one
    finally:
        a._stop.set()
        b.release()
