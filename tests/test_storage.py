"""pipeline.io.storage without a server: options, error classification, retries, streaming reads."""

from __future__ import annotations

import errno
import io
import tarfile
import uuid

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.io import storage
from pipeline.io.shards import Shard, read_samples
from pipeline.io.storage import (
    RetryingFile,
    StorageError,
    is_transient,
    options_for,
    parse_storage_options,
    resolve_storage_options,
    retry,
)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.001)


def test_options_apply_per_protocol_and_never_to_local_paths():
    flat = {"endpoint_url": "http://minio:9000"}
    assert options_for("s3://b/k", flat) == flat
    assert options_for("/data/x.tar", flat) == {}
    assert options_for("memory://x", flat) == {}
    nested = {"s3": {"anon": True}, "gs": {"project": "p"}}
    assert options_for("s3://b/k", nested) == {"anon": True}
    assert options_for("gs://b/k", nested) == {"project": "p"}
    assert options_for("gcs://b/k", nested) == {"project": "p"}
    assert options_for("file:///x", nested) == {}


def test_environment_fills_in_endpoint_profile_and_region_for_s3():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_PROFILE": "nightly",
           "AWS_REGION": "eu-west-1", "AWS_SECRET_ACCESS_KEY": "never-copied"}
    got = resolve_storage_options({}, ["s3://b/in", "/tmp/out"], env)
    assert got == {"endpoint_url": "http://127.0.0.1:9000", "profile": "nightly",
                   "client_kwargs": {"region_name": "eu-west-1"}}
    assert "never-copied" not in repr(got)
    explicit = resolve_storage_options({"endpoint_url": "http://x"}, ["s3://b"], env)
    assert explicit["endpoint_url"] == "http://x"
    nested = resolve_storage_options({"gs": {"token": "anon"}}, ["s3://b", "gs://c"], env)
    assert nested["gs"] == {"token": "anon"} and nested["s3"]["profile"] == "nightly"
    assert resolve_storage_options({}, ["/local", "gs://b"], env) == {}


def test_storage_options_from_json_or_file(tmp_path):
    assert parse_storage_options('{"anon": true}') == {"anon": True}
    (tmp_path / "opts.json").write_text('{"s3": {"endpoint_url": "http://e"}}')
    assert parse_storage_options(f"@{tmp_path / 'opts.json'}") == {
        "s3": {"endpoint_url": "http://e"}}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_storage_options("{nope")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        parse_storage_options("[1]")
    with pytest.raises(ValueError, match="cannot read storage options file"):
        parse_storage_options(f"@{tmp_path / 'missing.json'}")


class EndpointConnectionError(Exception):  # same name as botocore's
    pass


class HttpError(Exception):  # gcsfs style: an HTTP status in .code
    def __init__(self, code):
        super().__init__(f"HTTP {code}")
        self.code = code


@pytest.mark.parametrize("exc, transient", [
    (ConnectionResetError(), True),
    (TimeoutError(), True),
    (OSError(errno.EBUSY, "SlowDown"), True),
    (OSError(errno.EIO, "weird"), False),
    (EndpointConnectionError("no route"), True),
    (HttpError(503), True),
    (HttpError(429), True),
    (HttpError(404), False),
    (FileNotFoundError("gone"), False),
    (PermissionError("denied"), False),
    (ValueError("bad data"), False),
])
def test_error_classification(exc, transient):
    assert is_transient(exc) is transient


def test_classification_follows_the_cause():
    wrapped = OSError(errno.EIO, "wrapped")
    wrapped.__cause__ = ConnectionResetError()
    assert is_transient(wrapped)


def test_retry_is_bounded_and_names_the_uri():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert retry(flaky, "s3://b/k", retries=5) == "ok" and len(calls) == 3

    def always_reset():
        raise ConnectionResetError("reset")

    with pytest.raises(StorageError, match=r"read failed 3 times .* s3://b/k: Connection"):
        retry(always_reset, "s3://b/k", "read", retries=2)


def test_permanent_errors_are_not_retried():
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("AccessDenied")

    with pytest.raises(PermissionError, match="access denied to s3://b/k: check the credentials"):
        retry(denied, "s3://b/k")
    assert len(calls) == 1


class FlakyMemoryFS(MemoryFileSystem):
    """memory:// whose open files fail reads at the given byte offsets, once each."""

    protocol = "flakymem"
    fail_at: list[int] = []
    opened = 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "r" not in mode:
            return f
        type(self).opened += 1
        fs = self
        real_read = f.read

        def read(n=-1):
            start = f.tell()
            end = start + (n if n >= 0 else 1 << 62)
            for offset in list(fs.fail_at):
                if start <= offset < end:
                    fs.fail_at.remove(offset)
                    raise ConnectionResetError(f"reset at {offset}")
            return real_read(n)

        f.read = read
        return f


def test_retrying_file_resumes_mid_stream_where_it_was():
    fs = FlakyMemoryFS()
    data = bytes(range(256)) * 4096  # 1 MiB
    path = f"/{uuid.uuid4().hex}/blob"
    fs.pipe_file(path, data)
    FlakyMemoryFS.fail_at = [10, 300_000, 900_000]
    FlakyMemoryFS.opened = 0
    with io.BufferedReader(RetryingFile(fs, path, "flakymem://blob"), 64 * 1024) as f:
        got = b"".join(iter(lambda: f.read(50_000), b""))
    assert got == data
    assert FlakyMemoryFS.fail_at == [] and FlakyMemoryFS.opened == 4  # 1 open + 3 reopens


def test_tar_shard_streams_through_transient_errors(monkeypatch):
    fs = FlakyMemoryFS()
    root = f"/{uuid.uuid4().hex}"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(20):
            payload = bytes([i]) * 5000
            info = tarfile.TarInfo(f"s{i:02d}.jpg")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    fs.pipe_file(f"{root}/a.tar", buffer.getvalue())
    FlakyMemoryFS.fail_at = [2_000, 60_000]
    monkeypatch.setattr(storage, "filesystem", lambda uri, opts=None: (fs, uri))
    from pipeline.io import shards

    monkeypatch.setattr(shards, "filesystem", lambda uri, opts=None: (fs, uri))
    shard = Shard(name="a", uri=f"flakymem://{root}/a.tar", format="tar",
                  paths=(f"{root}/a.tar",), root=root)
    samples = list(read_samples(shard))
    assert [s.key for s in samples] == [f"s{i:02d}" for i in range(20)]
    assert all(s.data == bytes([i]) * 5000 for i, s in enumerate(samples))
    assert FlakyMemoryFS.fail_at == []


def test_a_read_that_keeps_failing_gives_up_with_the_uri(monkeypatch):
    monkeypatch.setattr(storage, "RETRIES", 2)
    fs = FlakyMemoryFS()
    path = f"/{uuid.uuid4().hex}/blob"
    fs.pipe_file(path, b"x" * 1000)
    FlakyMemoryFS.fail_at = [0, 0, 0, 0]
    with pytest.raises(StorageError, match=r"read failed 3 times .*flakymem://blob"):
        RetryingFile(fs, path, "flakymem://blob").read(100)


def test_an_object_replaced_mid_read_is_an_error_never_two_versions_stitched():
    """A transient error, then the reopen finds another version of the object (same size,
    new bytes): today's reopen read on at the old offset of the new version."""
    fs = FlakyMemoryFS()
    path = f"/{uuid.uuid4().hex}/blob"
    fs.pipe_file(path, b"a" * 200_000)
    FlakyMemoryFS.fail_at = [150_000]
    f = io.BufferedReader(RetryingFile(fs, path, "flakymem://blob"), 64 * 1024)
    assert f.read(100_000) == b"a" * 100_000
    fs.pipe_file(path, b"b" * 200_000)  # replaced while the reader is half way
    with pytest.raises(storage.ObjectChanged, match="was replaced while it was read"):
        f.read()
    assert not storage.is_transient(storage.ObjectChanged("x"))


def test_s3fs_file_expired_is_not_retried():
    from s3fs.core import FileExpired  # s3fs's ETag check on an open file: the object changed

    calls = []

    def read():
        calls.append(1)
        raise FileExpired("bucket/shard.tar", '"etag-1"')

    assert not storage.is_transient(FileExpired("bucket/shard.tar", '"etag-1"'))
    with pytest.raises(FileExpired):
        retry(read, "s3://bucket/shard.tar")
    assert len(calls) == 1
