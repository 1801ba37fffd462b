"""s3:// in and out against a real S3-protocol server on loopback (moto in server mode)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from moto.server import ThreadedMotoServer
from support.helpers import tar_members
from support.s3server import FaultProxy

from pipeline.demo.synthetic import write_sample_archive
from pipeline.inference.config import InferConfig
from pipeline.inference.job import run_inference
from pipeline.io import storage
from pipeline.io.shards import list_shards

BUCKET = "faces"
SECRET = "planted-s3-secret-5d1e8b"  # moto takes any; must reach no file or log


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """Moto's S3 server and a fault proxy in front of it, both on loopback; a bucket holding
    two tar shards, one Parquet shard and a model file, and the same files locally."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = FaultProxy(server.get_host_and_port()).start()
    options = {"key": "testing", "secret": SECRET, "endpoint_url": proxy.url,
               "client_kwargs": {"region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key=SECRET,
                 ).create_bucket(Bucket=BUCKET)
    fs = s3fs.S3FileSystem(**options)
    local = tmp_path_factory.mktemp("local")
    write_sample_archive(str(local / "in"), num_shards=2, samples_per_shard=2, seed=5,
                         image_size=(128, 96))
    members = tar_members(local / "in" / "faces-00000.tar")
    import pyarrow as pa

    keys = sorted(k[:-4] for k in members if k.endswith(".jpg"))
    pq.write_table(pa.table({"key": keys, "image": [members[f"{k}.jpg"] for k in keys]}),
                   local / "in" / "batch.parquet")
    fs.put(str(local / "in") + "/", f"{BUCKET}/in/", recursive=True)
    yield {"fs": fs, "proxy": proxy, "options": options, "local": local}
    proxy.stop()
    server.stop()


def _run(input_uri, output_uri, weights, options, **kw):
    return run_inference(InferConfig(input=input_uri, output=output_uri, weights=weights,
                                     storage_options=options, batch_size=4, **kw))


def _read_s3(fs, prefix):
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(prefix))
    return names, {n: pq.read_table(f"{prefix}/{n}", filesystem=fs)
                   for n in names if n.endswith(".parquet")}


@pytest.fixture(scope="module")
def s3_job(ray_session, s3, weights_file):
    """The tar shards from s3:// with s3:// weights and output, and the same job on local files."""
    fs, options, local = s3["fs"], s3["options"], s3["local"]
    fs.put(weights_file[0], f"{BUCKET}/models/landmarks.pt")
    summary = _run(f"s3://{BUCKET}/in/*.tar", f"s3://{BUCKET}/out",
                   f"s3://{BUCKET}/models/landmarks.pt", options)
    local_summary = _run(str(local / "in" / "*.tar"), str(local / "out"), weights_file[0], {})
    return summary, local_summary


def test_s3_input_output_and_weights_give_the_local_rows(s3, s3_job):
    summary, local_summary = s3_job
    names, tables = _read_s3(s3["fs"], f"{BUCKET}/out")
    errors = [r["error"] for t in tables.values() for r in t.to_pylist() if r["error"]]
    assert (summary.samples, summary.errors) == (4, 0), errors
    assert summary.model_version == local_summary.model_version
    assert names == ["_done", "_input.json", "_manifest", "_manifest.json", "_report",
                     "part-faces-00000.parquet",
                     "part-faces-00001.parquet"]
    for name, table in tables.items():
        local = pq.read_table(s3["local"] / "out" / name)
        assert table.column("shard").to_pylist() == [
            f"s3://{BUCKET}/in/{name[5:-8]}.tar"] * 2
        assert table.drop(["shard"]).equals(local.drop(["shard"])), name
    done = json.loads(s3["fs"].cat(f"{BUCKET}/out/_done/faces-00001.json"))
    assert done["rows"] == 2 and done["file"] == "part-faces-00001.parquet"


def test_storage_secret_reaches_no_output_file_or_log(s3, s3_job):
    """The inference job had the secret (it read and wrote s3:// with it); it is in no object
    it wrote, no local file and no log of this session's Ray (tasks get storage options as
    arguments, through the object store, and a failing task's message must not show them)."""
    import ray

    manifest = s3["fs"].cat(f"{BUCKET}/out/_manifest.json").decode()
    assert json.loads(manifest)["config"]["storage_options"] == [
        "client_kwargs", "endpoint_url", "key", "secret"]  # names only
    assert SECRET not in repr(InferConfig(input="a", output="b", storage_options=s3["options"]))
    objects = [p for p in s3["fs"].find(f"{BUCKET}/out") if not p.endswith("/")]
    assert len(objects) >= 5
    for path in objects:
        assert SECRET.encode() not in s3["fs"].cat(path), path
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    scanned = [p for place in (logs, s3["local"]) for p in place.rglob("*") if p.is_file()]
    assert len(scanned) > 20
    for path in scanned:
        assert SECRET.encode() not in path.read_bytes(), path


def test_parquet_shard_on_s3(ray_session, s3, s3_job, weights_file):
    summary = _run(f"s3://{BUCKET}/in/batch.parquet", f"s3://{BUCKET}/out-pq",
                   f"s3://{BUCKET}/models/landmarks.pt", s3["options"])
    assert (summary.samples, summary.errors) == (2, 0)
    table = pq.read_table(f"{BUCKET}/out-pq/part-batch.parquet", filesystem=s3["fs"])
    # Same images, no face box in this Parquet: keys match the tar's first shard.
    assert table.column("key").to_pylist() == ["face-00000-00000", "face-00000-00001"]
    assert np.isfinite(np.asarray(table.column("landmarks").to_pylist())).all()


def test_transient_errors_are_retried_and_every_row_arrives(ray_session, s3, s3_job,
                                                            monkeypatch):
    proxy = s3["proxy"]
    proxy.reset()
    faults = ["slowdown", "reset", "internal", "slowdown", "reset", "internal", "slowdown"]
    proxy.inject("faces-00001.tar", faults)
    # Listing the input, and writing an output file and a completion record, fail too.
    proxy.inject("list-type=", ["slowdown", "reset", "internal"], on=("LIST",))
    proxy.inject("out-flaky/part-faces-00000", ["internal", "reset", "slowdown"], on=("PUT",))
    proxy.inject("out-flaky/_done/faces-00001", ["reset", "internal"], on=("PUT",))
    summary = _run(f"s3://{BUCKET}/in/*.tar", f"s3://{BUCKET}/out-flaky",
                   f"s3://{BUCKET}/models/landmarks.pt", s3["options"])
    served = proxy.served_faults
    assert [kind for path, kind in served if "faces-00001.tar" in path] == faults
    assert [kind for path, kind in served if "list-type=" in path] == [
        "slowdown", "reset", "internal"]
    assert [kind for path, kind in served if "out-flaky/part-faces-00000" in path] == [
        "internal", "reset", "slowdown"]
    assert [kind for path, kind in served if "out-flaky/_done/faces-00001" in path] == [
        "reset", "internal"]
    assert (summary.samples, summary.errors) == (4, 0)
    _, tables = _read_s3(s3["fs"], f"{BUCKET}/out-flaky")
    _, clean = _read_s3(s3["fs"], f"{BUCKET}/out")
    for name, table in tables.items():
        assert table.equals(clean[name]), name


def test_access_denied_fails_the_shard_fast_and_says_so(ray_session, s3, s3_job):
    proxy = s3["proxy"]
    proxy.reset()
    proxy.deny("faces-00000.tar")
    started = time.time()
    summary = _run(f"s3://{BUCKET}/in/*.tar", f"s3://{BUCKET}/out-denied",
                   f"s3://{BUCKET}/models/landmarks.pt", s3["options"])
    proxy.reset()
    assert (summary.samples, summary.errors) == (3, 1)
    _, tables = _read_s3(s3["fs"], f"{BUCKET}/out-denied")
    row = tables["part-faces-00000.parquet"].to_pylist()[0]
    assert row["key"] == "" and "access denied to s3://faces/in/faces-00000.tar" in row["error"]
    assert tables["part-faces-00001.parquet"].num_rows == 2
    assert time.time() - started < 60


def test_missing_bucket_and_wrong_endpoint_say_what_is_wrong(s3, monkeypatch):
    missing = r"not found: s3://no-such-bucket/in \(check the bucket"
    with pytest.raises(FileNotFoundError, match=missing):
        list_shards("s3://no-such-bucket/in", storage_options=s3["options"])
    monkeypatch.setattr(storage, "RETRIES", 1)
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    wrong = {**s3["options"], "endpoint_url": "http://127.0.0.1:9",
             "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    with pytest.raises(storage.StorageError, match=r"listing failed 2 times .*127\.0\.0\.1:9"):
        list_shards(f"s3://{BUCKET}/in", storage_options=wrong)


def test_listing_is_one_request_per_thousand_keys(s3):
    fs, proxy = s3["fs"], s3["proxy"]
    fs.pipe({f"{BUCKET}/many/part-{i:05d}.tar": b"" for i in range(1200)})
    proxy.reset()
    s3fs.S3FileSystem.clear_instance_cache()
    shards = list_shards(f"s3://{BUCKET}/many/", storage_options=s3["options"])
    assert len(shards) == 1200 and shards[0].name == "part-00000"
    assert proxy.requests["GET"] <= 3  # 2 pages of 1,000 keys (+ at most one probe)


def test_invalid_credentials_or_an_unwritable_output_exit_2_before_any_work(s3, capsys):
    """Listing with credentials the store rejects, and an output prefix that may not be
    written: one line that says so, exit status 2, no shard read and no traceback."""
    from pipeline.cli.main import main

    proxy = s3["proxy"]
    options = json.dumps(s3["options"])
    base = ["infer", "--input", f"s3://{BUCKET}/in/", "--format", "tar", "--device", "cpu",
            "--storage-options", options]
    try:
        proxy.reset()
        proxy.deny("list-type=", on=("LIST",), kind="badkey")
        assert main([*base, "--output", f"s3://{BUCKET}/out-badkey"]) == 2
        err = capsys.readouterr().err
        assert f"error: access denied to s3://{BUCKET}/in/: check the credentials" in err, err
        assert "Traceback" not in err

        proxy.reset()
        proxy.deny("out-readonly/", on=("PUT",))
        assert main([*base, "--output", f"s3://{BUCKET}/out-readonly"]) == 2
        err = capsys.readouterr().err
        assert f"error: cannot write to s3://{BUCKET}/out-readonly: access denied" in err, err
        assert "Traceback" not in err
        assert not [p for m, p in proxy.log if m == "GET" and ".tar" in p]  # no shard read
        assert not s3["fs"].exists(f"{BUCKET}/out-readonly")
    finally:
        proxy.reset()
