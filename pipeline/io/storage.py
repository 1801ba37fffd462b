"""Every URI the jobs open goes through here: fsspec filesystems with the user's storage options,
bounded retries of transient storage errors, and clear messages for permanent ones.

Storage options are a flat dict for the remote protocol in use (``{"endpoint_url": ...}``) or a
dict keyed by protocol (``{"s3": {...}, "gs": {...}}``) when a job mixes stores. Local and
``memory://`` paths never receive them. For ``s3://`` the usual environment variables
(``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ``AWS_REGION``) are folded in on the driver, so Ray
workers on other machines use the same endpoint; secrets stay in the credential chain
(environment, profile files, instance roles) and never travel in the options.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from fsspec.core import split_protocol, url_to_fs

from pipeline.config.errors import BadInput

log = logging.getLogger("pipeline")
T = TypeVar("T")

LOCAL_PROTOCOLS = ("file", "local", "memory")
KNOWN_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "http", "https", "file", "memory")
RETRIES = 5
BACKOFF_S = 0.5
MAX_BACKOFF_S = 20.0
STREAM_BLOCK_BYTES = 16 << 20

_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError",
    "ClientPayloadError", "ClientOSError", "ServerTimeoutError", "IncompleteReadError",
    "ProtocolError", "ResponseStreamingError", "ChunkedEncodingError",
}
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ECONNRESET, errno.ETIMEDOUT,
                     errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                     getattr(errno, "EREMOTEIO", errno.EIO)}


class StorageError(OSError):
    """A storage operation failed for good; the message names the URI and what to do."""


class ObjectChanged(OSError):
    """The object was replaced while it was read: its bytes so far are of another version.
    Never retried (a reopen would read on in the new version at the old offset)."""


def version_marker(info: Mapping[str, Any]) -> str:
    """The store's version marker in an object's info (ETag, generation, mtime...), or ""."""
    return str(next((info[k] for k in ("ETag", "etag", "VersionId", "generation", "md5Hash",
                                       "mtime", "LastModified", "updated", "created")
                     if info.get(k)), ""))


def version_of(info: Mapping[str, Any]) -> tuple:
    """What tells two versions of an object apart: size and the store's version marker."""
    return info.get("size"), version_marker(info)


# Secrets a URI may carry: a password in its user info, and its query string (presigned
# URLs: X-Amz-Signature, a GCS or Azure SAS token). Anything that leaves the process (logs,
# saved configs, manifests, records, rows, reports, error messages) goes through ``redact``.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:'\"]*):[^/@\s'\"]*@")
_QUERY = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s?#'\"]*)\?[^\s#'\"]*")
REDACTED_SECRET = "<redacted>"


def redact(text: str) -> str:
    """``text`` with every URL's password and query string replaced by ``<redacted>``."""
    if "://" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{REDACTED_SECRET}@", text)
    return _QUERY.sub(lambda m: f"{m['head']}?{REDACTED_SECRET}", text)


def redact_values(value: Any) -> Any:
    """``redact`` on every string of a JSON-like value."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """A log handler's filter: the record's text without URL secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def protocol_of(uri: str) -> str:
    return split_protocol(uri)[0] or "file"


def options_for(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options that apply to ``uri``'s protocol."""
    protocol = protocol_of(uri)
    if protocol in LOCAL_PROTOCOLS or not storage_options:
        return {}
    if all(key in KNOWN_PROTOCOLS for key in storage_options):
        aliases = {"s3a": "s3", "gcs": "gs"}
        nested = storage_options.get(protocol) or storage_options.get(aliases.get(protocol, ""))
        return dict(nested or {})
    return dict(storage_options)


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None):
    """``(fs, path)`` for ``uri`` with its storage options."""
    return url_to_fs(uri, **options_for(uri, storage_options))


def resolve_storage_options(
    given: Mapping[str, Any] | None, uris: list[str], environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """Add what the environment says about S3 (endpoint, profile, region) to the given options,
    for the S3 URIs among ``uris``; explicit options win."""
    options = dict(given or {})
    if not any(protocol_of(u) in ("s3", "s3a") for u in uris if u):
        return options
    nested = bool(options) and all(k in KNOWN_PROTOCOLS for k in options)
    s3 = dict(options.get("s3", {})) if nested else options
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in s3:
        s3["endpoint_url"] = endpoint
    if environ.get("AWS_PROFILE") and "profile" not in s3:
        s3["profile"] = environ["AWS_PROFILE"]
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region and "region_name" not in s3.get("client_kwargs", {}):
        s3["client_kwargs"] = {**s3.get("client_kwargs", {}), "region_name": region}
    if nested:
        options["s3"] = s3
        return options
    return s3


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options``: a JSON object, or ``@path`` of a JSON file holding one."""
    if not text:
        return {}
    source = "--storage-options"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise BadInput(f"cannot read storage options file {source}: {exc}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadInput(f"{source} must hold a JSON object")
    return value


def storage_options_arg(text: str | None) -> dict[str, Any]:
    """argparse ``type=`` for ``--storage-options``."""
    import argparse

    try:
        return parse_storage_options(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def is_transient(exc: BaseException) -> bool:
    """Throttling, 5xx, dropped or refused connections and timeouts: worth another try.
    Missing objects and denied access are not."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                            ObjectChanged)) or type(exc).__name__ == "FileExpired":
            return False  # s3fs's FileExpired: the ETag changed under an open file
        if isinstance(exc, (TimeoutError, ConnectionError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        if type(exc).__name__ in _TRANSIENT_NAMES:
            return True
        status = getattr(exc, "code", None) or getattr(exc, "status", None)
        if isinstance(status, int) and (status == 429 or 500 <= status < 600):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def explain(exc: BaseException, uri: str) -> str:
    """One line a user can act on (no URL secrets in it)."""
    if isinstance(exc, FileNotFoundError):
        return redact(f"not found: {uri} (check the bucket / path and the endpoint)")
    if isinstance(exc, PermissionError):
        return redact(f"access denied to {uri}: check the credentials and the bucket policy")
    return redact(f"{uri}: {exc.__class__.__name__}: {exc}")


def retry(
    fn: Callable[[], T], uri: str, what: str = "", retries: int | None = None,
    backoff: float | None = None,
) -> T:
    """Call ``fn``; retry transient storage errors with jittered exponential backoff, at most
    ``retries`` (default ``RETRIES``) more times. A permanent error, or the last transient one,
    raises ``StorageError`` (or ``FileNotFoundError`` / ``PermissionError``) naming ``uri``."""
    retries = RETRIES if retries is None else retries
    backoff = BACKOFF_S if backoff is None else backoff
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                if isinstance(exc, (FileNotFoundError, PermissionError)):
                    raise type(exc)(explain(exc, uri)) from exc
                raise
            if attempt == retries:
                raise StorageError(f"{what or 'storage request'} failed {retries + 1} times "
                                   f"with transient errors; last: {explain(exc, uri)}") from exc
            delay = min(MAX_BACKOFF_S, backoff * 2**attempt) * random.uniform(0.5, 1.5)
            log.warning("transient storage error on %s (%s), retry %d/%d in %.1f s",
                        redact(uri), exc.__class__.__name__, attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class RetryingFile(io.RawIOBase):
    """A read-only file that survives transient errors mid-stream: it reopens the object and
    seeks back to where it was, once it checked the object is still the version it began
    reading (``ObjectChanged`` otherwise). Reads are sequential ranges: memory stays bounded."""

    def __init__(self, fs, path: str, uri: str, retries: int | None = None,
                 backoff: float | None = None, **open_kwargs):
        super().__init__()
        self.fs, self.path, self.uri = fs, path, uri
        self.retries, self.backoff, self.open_kwargs = retries, backoff, open_kwargs
        self.position = 0
        self._file = retry(self._open, uri, "open")
        self.version = self._version()

    def _open(self):
        return self.fs.open(self.path, "rb", **self.open_kwargs)

    def _version(self) -> tuple:
        details = getattr(self._file, "details", None)  # s3fs / gcsfs: from the open's HEAD
        return version_of(details if isinstance(details, Mapping) and details
                          else self.fs.info(self.path))

    def _reopen(self) -> None:
        with contextlib.suppress(Exception):  # the old connection is already broken
            self._file.close()
        self._file = self._open()
        if self._version() != self.version:
            raise ObjectChanged(f"{self.uri} was replaced while it was read (size and version "
                                f"marker {self.version} -> {self._version()}): the shard is "
                                "read again by the next run, not stitched from two versions")
        self._file.seek(self.position)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        failed = [False]

        def read() -> bytes:
            if failed[0]:
                self._reopen()
            failed[0] = True
            return self._file.read(len(buffer))

        data = retry(read, self.uri, "read", self.retries, self.backoff)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = retry(lambda: self._file.seek(offset, whence), self.uri, "seek")
        return self.position

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def open_for_reading(path: str, fs, uri: str, buffer_size: int = 1 << 20):
    """A buffered, retrying reader of ``fs``'s path (``uri`` is what messages name).

    Object stores are read in ranged requests of ``STREAM_BLOCK_BYTES``: s3fs's default (50 MB
    blocks with read-ahead) held more than a whole 128 MB shard in memory at once; 16 MB blocks
    keep a read task's footprint near 2 blocks whatever the shard size (jobs/benchmark_storage.py).
    """
    raw = RetryingFile(fs, path, uri, block_size=STREAM_BLOCK_BYTES)
    return io.BufferedReader(raw, buffer_size=buffer_size)


def read_bytes(uri: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    return retry(lambda: fs.cat_file(path), uri, "read")


def check_writable(folder: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write and remove a small object under ``folder``, so that an output the job cannot write
    fails before any work (``PermissionError`` / ``StorageError`` naming it) instead of at the
    first commit."""
    import uuid

    probe = f"{folder.rstrip('/')}/_write-check-{uuid.uuid4().hex[:12]}"
    try:
        write_bytes(probe, b"", storage_options)
        fs, path = filesystem(probe, storage_options)
        retry(lambda: fs.rm_file(path), probe, "delete")
    except PermissionError as exc:
        raise PermissionError(f"cannot write to {folder}: {exc}") from exc
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise PermissionError(f"cannot write to {folder}: {explain(exc, probe)}") from exc


def write_bytes(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a whole file so that readers see the old one or the whole new one: a single PUT on
    object stores; locally a hidden temporary file in the same folder, then an atomic rename
    (dataset readers skip names starting with ".")."""
    fs, path = filesystem(uri, storage_options)
    if protocol_of(uri) in ("file", "local"):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    retry(lambda: fs.pipe_file(path, data), uri, "write")


# -- conditional writes: compare-and-swap where the store has it --------------------------------

CAS_PROTOCOLS = ("file", "local", "s3", "s3a")  # stores with a conditional write


def read_tagged(uri: str, storage_options: Mapping[str, Any] | None = None
                ) -> tuple[bytes, str] | None:
    """A small object's bytes and the tag of that version (its S3 ETag; locally a hash of
    the bytes), for ``write_if``; None when it does not exist."""
    fs, path = filesystem(uri, storage_options)
    if protocol_of(uri) in ("file", "local"):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def read() -> tuple[bytes, str]:
        fs.invalidate_cache(path)
        with fs.open(path, "rb") as f:  # s3fs reads the version whose ETag it reports
            return f.read(), str(f.details.get("ETag", ""))

    try:
        return retry(read, uri, "read")
    except FileNotFoundError:
        return None


def write_if(uri: str, data: bytes, tag: str | None,
             storage_options: Mapping[str, Any] | None = None) -> bool | None:
    """Write ``data`` only if the object is still the version ``tag`` (``read_tagged``), or,
    with ``tag`` None, only if it does not exist: True when written, False when another
    writer got there first, None when the store has no conditional write (the caller falls
    back to write, wait, read back). S3 sends ``If-None-Match: *`` / ``If-Match: ETag``;
    locally the compare and the rename happen under an exclusive ``flock`` of the folder, so
    two processes (on this machine, or on NFS hosts that honour flock) never both succeed."""
    protocol = protocol_of(uri)
    if protocol not in CAS_PROTOCOLS:
        return None
    fs, path = filesystem(uri, storage_options)
    if protocol in ("file", "local"):
        import fcntl

        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        lock = os.open(folder, os.O_RDONLY)  # the folder itself: no lock file left behind
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = read_tagged(uri, storage_options)
            if (current is None) != (tag is None) or (current and current[1] != tag):
                return False
            write_bytes(uri, data, storage_options)
            return True
        finally:
            os.close(lock)  # (closing releases the flock)
    condition = {"mode": "create"} if tag is None else {"IfMatch": tag}
    try:
        fs.pipe_file(path, data, **condition)  # one PUT: never retried blindly
    except FileExistsError:  # s3fs's If-None-Match failure
        return False
    except OSError as exc:
        if "pre-condition" in str(exc) or "PreconditionFailed" in str(exc):
            return False
        if "NotImplemented" in str(exc):  # an S3-compatible store without conditions
            return None
        raise
    finally:
        fs.invalidate_cache(path)
    return True
