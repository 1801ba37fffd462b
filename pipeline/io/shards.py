"""Find input shards and stream the samples out of them, through fsspec.

Three layouts, registered in ``SHARD_FORMATS`` (the end of this module):

- ``tar``: WebDataset-style; consecutive members sharing a key (the member name up to the first
  dot of its file name) form a sample: one image member plus an optional ``.json`` sidecar.
- ``parquet``: one row per sample, with an image-bytes column and a key column (names
  configurable); a ``bbox`` column is used as the face box and other scalar columns pass through
  to ``meta``.
- ``images``: loose image files; each file is a sample keyed by its path relative to the input
  root, and the sorted files are grouped into shards of ``files_per_shard`` on average, by path
  hash, so that adding or removing files changes only their own groups (``group_images``).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import decimal
import hashlib
import io
import json
import math
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fsspec.spec import AbstractFileSystem

from pipeline.config.errors import BadInput
from pipeline.io.storage import (
    StorageError,
    filesystem,
    open_for_reading,
    redact,
    retry,
    version_marker,
)

# Piece k >= 1 of a big shard is named <shard name>.c<k:05d> (pipeline.stages.units).
CHUNK_NAME = re.compile(r"(.+)\.c(\d{5,})")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".ppm", ".bmp")
# An image file above this many bytes is a ``too_large`` row, skipped without being read (a
# 400 MB tar member once cost a read task 805 MB). 64 MiB holds a 4:2:0 JPEG or PNG far above
# --max-pixels' 100 MP; --max-image-bytes raises it.
DEFAULT_MAX_IMAGE_BYTES = 64 << 20
DEFAULT_FILES_PER_SHARD = 256  # loose images: files per output file (one "shard")


@dataclass(frozen=True)
class Shard:
    """One unit of input: a tar or Parquet file, or a group of loose image files."""

    name: str  # stable, unique within the input: names the output file
    uri: str  # what the output rows record as ``shard``
    format: str
    paths: tuple[str, ...] = field(default_factory=tuple)  # filesystem paths (no protocol)
    root: str = ""  # the listing root: loose images are keyed by their path relative to it
    fingerprint: str = ""  # total size and a hash of the files' ETags / mtimes at listing time
    size: int = 0  # bytes at listing time (what read tasks are sized by)


@dataclass
class Sample:
    """One input sample before decoding; ``error`` set when it cannot be used."""

    key: str
    data: bytes | None = None
    meta: dict[str, Any] | None = None
    meta_error: str | None = None
    error: str | None = None
    error_kind: str | None = None


class DamagedShardError(ValueError):
    """The shard ends before its end-of-archive marker, or is otherwise damaged."""


@dataclass(frozen=True)
class Unread:
    """A tar member that is not read: why (a row's ``error``) and its ``error_kind``."""

    error: str
    kind: str


def _hidden(relative_path: str) -> bool:
    """A path under the listing root that is not input: a component starting with ``.`` or
    ``_`` (Spark's ``_temporary/``, ``_SUCCESS``, ``.staging/``, this job's ``_manifest/``)."""
    return any(part.startswith((".", "_")) for part in relative_path.split("/") if part)


def _list_once(fs, root: str, input_uri: str) -> dict[str, dict]:
    """``{path: info}`` of every file under ``root`` (or matching it, for a glob) from one
    recursive listing: on S3 one request per 1,000 keys, whatever the folder depth."""
    def listing():
        if any(ch in root for ch in "*?["):
            return fs.glob(root, detail=True)
        found = _find_strict(fs, root)
        if not found and fs.isfile(root):
            found = {root: fs.info(root)}
        return found

    found = retry(listing, input_uri, "listing")
    files = {p.rstrip("/"): info for p, info in found.items() if info.get("type") != "directory"}
    if files or any(ch in root for ch in "*?["):  # a glob that matches nothing: no shards
        return files
    if not retry(lambda: fs.exists(root), input_uri, "listing"):
        raise FileNotFoundError(f"input not found: {input_uri}")
    return {}


def _find_strict(fs, root: str) -> dict[str, dict]:
    """``fs.find(root, detail=True)``, where a folder that cannot be listed (denied) is an
    error, never an absence: fsspec's generic walk (local files and most filesystems) omits
    such a folder, and does not pass its ``on_error="raise"`` on to the folders below, so the
    shards in it vanished from the run and their outputs were retired as stale. Object stores,
    which list a prefix in one request of their own, keep their ``find``."""
    if type(fs).find is not AbstractFileSystem.find:
        return fs.find(root, detail=True)
    found: dict[str, dict] = {}
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            entries = fs.ls(folder, detail=True)
        except FileNotFoundError:  # the root is missing (the caller says so), or a folder
            continue  # was deleted since its parent was listed: truly absent
        for info in entries:
            name = info["name"].rstrip("/")
            if info.get("type") == "directory":
                if name != root.rstrip("/"):
                    folders.append(name)
            else:
                found[name] = info
    return found


def _fingerprint(infos: list[dict]) -> str:
    """Size plus the store's version marker (ETag / generation / mtime) of the shard's files:
    what a later run compares to tell whether a shard changed."""
    digest = hashlib.sha256()
    for info in infos:
        digest.update(f"{info.get('name')}|{info.get('size')}|{version_marker(info)}\n"
                      .encode())
    return f"{sum(int(i.get('size') or 0) for i in infos)}:{digest.hexdigest()[:16]}"


def list_shards(
    input_uri: str,
    fmt: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
    files_per_shard: int = DEFAULT_FILES_PER_SHARD,
) -> list[Shard]:
    """List the input once and return its shards, sorted.

    ``input_uri`` is a file, a folder / prefix (searched recursively) or a glob pattern.
    """
    if fmt not in FORMATS:
        raise BadInput(f"format must be one of {FORMATS}, got {fmt!r}")
    if files_per_shard < 1:
        raise BadInput(f"files_per_shard must be >= 1, got {files_per_shard}")
    fs, root = filesystem(input_uri, storage_options)
    root = root.rstrip("/") or root
    infos = _list_once(fs, root, input_uri)
    if any(ch in root for ch in "*?["):
        root = root[: min(root.find(ch) for ch in "*?[" if ch in root)].rsplit("/", 1)[0]
    elif list(infos) == [root]:  # the input is a single file
        root = posixpath.dirname(root)

    def relative(path: str) -> str:
        return posixpath.relpath(path, root) if root else path

    by_kind: dict[str, list[str]] = {}
    for path in sorted(infos):
        kind = format_of(path)
        if kind is not None and not _hidden(relative(path)):
            by_kind.setdefault(kind, []).append(path)
    if fmt == "auto":
        if len(by_kind) > 1:
            found = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items()))
            raise BadInput(f"{input_uri} holds several shard formats ({found}); pick one with "
                             "--format tar|parquet|images")
        fmt = next(iter(by_kind), "tar")
    selected = by_kind.get(fmt, [])
    if not selected:
        raise BadInput(f"no {fmt} shards found under {input_uri} "
                       f"(looked for {', '.join(SHARD_FORMATS[fmt].extensions)})")

    protocol = input_uri.split("://", 1)[0] + "://" if "://" in input_uri else ""

    def public(path: str) -> str:
        """What rows, records and messages name a shard by: its URI without secrets (an http
        path is a whole URL already). ``paths`` keep what reads it."""
        return redact(path if "://" in path else protocol + path)

    if SHARD_FORMATS[fmt].groups_files:
        return [
            Shard(name=name, uri=public(root), format=fmt, paths=tuple(group),
                  root=root, fingerprint=_fingerprint([infos[p] for p in group]),
                  size=sum(int(infos[p].get("size") or 0) for p in group))
            for name, group in group_images(selected, relative, files_per_shard)
        ]
    shards = [
        Shard(name=shard_name(posixpath.splitext(relative(p))[0]), uri=public(p),
              format=fmt, paths=(p,), root=root, fingerprint=_fingerprint([infos[p]]),
              size=int(infos[p].get("size") or 0))
        for p in selected
    ]
    del infos
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.name in seen:
            raise BadInput(f"{seen[shard.name]} and {shard.uri} would both be written as "
                             f"part-{shard.name}.parquet: rename one of them")
        seen[shard.name] = shard.uri
    for shard in shards:  # a big shard's later pieces are part-<name>.cNNNNN.parquet
        match = CHUNK_NAME.fullmatch(shard.name)
        if match and match.group(1) in seen:
            raise BadInput(f"{shard.uri} would be written as part-{shard.name}.parquet, the "
                             f"name of a later piece of {seen[match.group(1)]}: rename it")
    return shards


# Output names: what every store and file system takes as a plain name. Anything else in a
# shard's path (":" that fsspec reads as a URL chain in "a::b", glob characters "[]*?", "%",
# "#", spaces, any non-ASCII letter) is percent-encoded, "%" included, so that two different
# paths never share a name; a name longer than NAME_BYTES keeps its start and ends in a hash of
# the whole (the 255-byte file name limit, with room for "part-", ".cNNNNN" and ".parquet").
NAME_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
NAME_BYTES = 200


def shard_name(relative_path: str) -> str:
    """The output name of the shard at ``relative_path`` (below the listing root, without
    its extension): safe on every store, unique and stable (see ``NAME_SAFE``)."""
    flat = relative_path.replace("/", "__")
    name = "".join(c if c in NAME_SAFE else "".join(f"%{b:02X}" for b in c.encode(
        "utf-8", "surrogateescape")) for c in flat)
    if name.startswith("."):  # never a hidden file, never "." or ".."
        name = "%2E" + name[1:]
    if len(name) > NAME_BYTES:
        name = f"{name[:NAME_BYTES - 17]}-{_path_hash(relative_path)[:16]}"
    return name


def _path_hash(relative_path: str) -> str:
    return hashlib.sha1(relative_path.encode("utf-8", "surrogateescape")).hexdigest()


def group_images(paths: list[str], relative, files_per_shard: int
                 ) -> list[tuple[str, list[str]]]:
    """Loose images (sorted) in groups of ``files_per_shard`` on average, stable under
    insertions and removals: a group starts at an *anchor*, a file whose path hash falls on a
    multiple of ``files_per_shard``, and is named after it (``images-<hash>``; the files before
    the first anchor are ``images-head``). Adding or removing a file changes its own group only
    (an added anchor splits one group in two), so the other groups keep their names, files and
    completion records. A group that reaches ``4 x files_per_shard`` files is cut there, at
    the next file, so no group grows without bound."""
    groups: list[tuple[str, list[str]]] = []
    for path in paths:
        digest = _path_hash(relative(path))
        anchor = int(digest[:12], 16) % files_per_shard == 0
        if not groups or anchor or len(groups[-1][1]) >= 4 * files_per_shard:
            groups.append((f"images-{digest[:12]}" if groups or anchor else "images-head", []))
        groups[-1][1].append(path)
    return groups


def read_samples(
    shard: Shard,
    storage_options: Mapping[str, Any] | None = None,
    image_column: str = "image",
    key_column: str = "key",
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Iterator[Sample]:
    """Stream the samples of one shard in order. Errors of one sample stay in that sample;
    an error that stops the shard is raised after the samples read before it. A tar member
    above ``max_image_bytes`` is a ``too_large`` row, never read."""
    fs = filesystem(shard.uri, storage_options)[0]
    options = ReadOptions(image_column, key_column, max_image_bytes)
    yield from _shard_format(shard).read(fs, shard, options)


def _read_images(fs, shard: Shard, options: ReadOptions) -> Iterator[Sample]:
    """A group of loose image files, a sample each, keyed by its path below the input root."""
    transient: list[str] = []
    for path in shard.paths:
        key = posixpath.relpath(path, shard.root) if shard.root else path
        uri = redact(fs.unstrip_protocol(path))
        try:
            yield Sample(key=key, data=retry(lambda p=path: fs.cat_file(p), uri, "read"))
        except FileNotFoundError:
            yield Sample(key=key, error=f"file disappeared before it was read: {uri}",
                         error_kind="missing_file")
        except StorageError as exc:  # transient errors that outlasted the retries
            transient.append(uri)
            yield Sample(key=key, error=str(exc), error_kind="storage")
        except OSError as exc:  # access denied: permanent, a rerun would not help
            yield Sample(key=key, error=str(exc), error_kind="storage")
    if transient:
        # Every file has its row; the shard-level error marks the group incomplete, so the
        # next run reads it again instead of keeping these rows as final.
        raise StorageError(f"{len(transient)} file(s) could not be read for transient "
                           f"storage errors, e.g. {transient[0]}: the group is redone by "
                           "the next run")


def estimate_rows(shard: Shard, storage_options: Mapping[str, Any] | None = None,
                  probe_bytes: int = 1 << 20) -> int | None:
    """About how many rows (samples) a shard holds, for cutting it into slices: loose images
    one per file; Parquet from its footer; tar from the samples in its first ``probe_bytes``
    (one ranged read), scaled to its size. None when it cannot tell (it is then not sliced)."""
    try:
        return _shard_format(shard).estimate(filesystem(shard.uri, storage_options)[0], shard,
                                             probe_bytes)
    except Exception:  # an estimate only: the shard is read whole instead
        return None


def _count_images(fs, shard: Shard, probe_bytes: int) -> int:
    return len(shard.paths)


def _count_parquet(fs, shard: Shard, probe_bytes: int) -> int:
    import pyarrow.parquet as pq

    with fs.open(shard.paths[0], "rb") as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def _count_tar(fs, shard: Shard, probe_bytes: int) -> int | None:
    """The samples in the first ``probe_bytes`` (one ranged read), scaled to the shard's size."""
    path = shard.paths[0]
    head = retry(lambda: fs.cat_file(path, start=0, end=probe_bytes), shard.uri, "read")
    keys, consumed = set(), 0
    with contextlib.suppress(tarfile.TarError, EOFError, OSError), \
            tarfile.open(fileobj=io.BytesIO(head), mode="r:") as tar:
        for info in tar:
            end = info.offset_data + -(-info.size // BLOCK) * BLOCK
            if end > len(head):
                break
            keys.add(_split_member_name(info.name)[0])
            consumed = end
    if not keys or not consumed:
        return None
    if len(head) < probe_bytes:  # the whole shard was in the probe
        return len(keys)
    return max(1, round(len(keys) * shard.size / consumed))


def _samples_from_members(key: str, members: dict[str, bytes | Unread]) -> list[Sample]:
    """The sample of one key's members: its first image (by extension) and sidecar. Every
    further image of the key is a ``duplicate_key`` row of its own, never dropped unseen."""
    sample = Sample(key=key)
    images = sorted(ext for ext in members if "." + ext in IMAGE_EXTENSIONS)
    sidecar = members.get("json")
    if isinstance(sidecar, Unread):
        sample.meta_error = sidecar.error
    elif sidecar is not None:
        try:
            meta = json.loads(sidecar.decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("sidecar must be a JSON object")
            sample.meta = meta
        except (UnicodeDecodeError, ValueError) as exc:
            sample.meta_error = f"sidecar {key}.json is not valid JSON: {exc}"
    if not key or key.endswith("/"):
        sample.error, sample.error_kind = (f"a tar member without a key (file name "
                                           f"{key + '.' + (images or ['?'])[0]!r})", "bad_key")
    elif images and isinstance(members[images[0]], Unread):
        sample.error, sample.error_kind = members[images[0]].error, members[images[0]].kind
    elif images:
        sample.data = members[images[0]]
    else:
        unread = [m for m in members.values() if isinstance(m, Unread)]
        found = ", ".join("." + ext for ext in sorted(members)) or "nothing"
        sample.error, sample.error_kind = (
            (unread[0].error, unread[0].kind) if unread else
            (f"no image member for key {key!r} (found {found})", "no_image"))
    extra = [Sample(key=key, error=f"key {key!r} has another image member, .{ext}, besides "
                    f".{images[0]} (the key's row before this one)", error_kind="duplicate_key")
             for ext in images[1:]]
    return [sample, *extra]


def _member_type(info: tarfile.TarInfo) -> str:
    if info.islnk():
        return f"hard link to {info.linkname!r}"
    if info.issym():
        return f"symbolic link to {info.linkname!r}"
    if info.ischr() or info.isblk():
        return "device"
    if info.isfifo():
        return "FIFO"
    return f"member of type {info.type!r}"


def _split_member_name(name: str) -> tuple[str, str]:
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def _read_tar(fs, shard: Shard, options: ReadOptions) -> Iterator[Sample]:
    """Stream a tar shard member by member (mode ``r|``: never seeks back, never loads it whole).

    tarfile ends its iteration without an error at a damaged member header, and takes a file
    cut between two members for a whole one; so after it stops, the rest of the file must be the
    end-of-archive zero blocks. Anything else is damage: the reader looks for the next valid
    header, goes on from there (so later members still get rows), and raises
    ``DamagedShardError`` after the last sample, so the shard gets its error row and is redone.

    Every member is a row or part of one: links, devices and FIFOs are ``unsupported_member``
    rows (a link's target is not followed: the stream never goes back), a member above
    ``max_image_bytes`` is a ``too_large`` row whose bytes are skipped, not read into memory
    (pax and GNU long names and sparse files are regular members to tarfile). Folder entries
    hold nothing and are passed over.
    """
    path, uri, max_image_bytes = shard.paths[0], shard.uri, options.max_image_bytes
    damage: list[str] = []
    with open_for_reading(path, fs, uri) as f:
        size = f.seek(0, 2)
        start, key, members = 0, None, {}
        while True:
            f.seek(start)
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    if info.isdir():
                        continue
                    member_key, ext = _split_member_name(info.name)
                    # A new key, or the same key again with a member it already has: a new
                    # sample (the duplicate key is flagged downstream instead of merged).
                    if key is not None and (member_key != key or ext in members):
                        yield from _samples_from_members(key, members)
                        members = {}
                    key = member_key
                    if not info.isfile():
                        members[ext] = Unread(
                            f"tar member {info.name!r} is a {_member_type(info)}: only regular "
                            "files are read (store the image itself in the shard)",
                            "unsupported_member")
                    elif info.size > max_image_bytes:
                        members[ext] = Unread(
                            f"tar member {info.name!r} is {info.size} bytes, above the "
                            f"{max_image_bytes} of --max-image-bytes: not read", "too_large")
                    else:
                        extracted = tar.extractfile(info)
                        members[ext] = extracted.read() if extracted is not None else b""
                stopped = start + tar.offset  # where the next header would be
            bad = _first_data_block(f, stopped, size)
            if bad is None:
                break
            resume = _next_header(f, bad, size)
            what = (f"a damaged member header at byte {bad}" if bad == stopped else
                    f"end-of-archive blocks at byte {stopped} with more data after them")
            damage.append(what + (f" (went on at the next valid header, byte {resume})"
                                  if resume is not None else " (no valid header after it)"))
            if resume is None:
                break
            start = resume
        if key is not None:
            yield from _samples_from_members(key, members)
        if damage:
            raise DamagedShardError(f"{uri} has {'; '.join(damage)}: the members in between "
                                    "are lost")
        # Only zero blocks follow where tarfile stopped; every tar writer ends the archive with
        # at least two of them: fewer, and the shard was cut (possibly between two members).
        if size - stopped < 2 * BLOCK:
            raise DamagedShardError(f"{uri} ends without the tar end-of-archive marker: "
                                    "the shard is truncated")


BLOCK = tarfile.BLOCKSIZE


def _first_data_block(f, offset: int, size: int) -> int | None:
    """The offset of the first block at or after ``offset`` that is not all zeros."""
    f.seek(offset)
    position = offset
    while position < size:
        chunk = f.read(min(1 << 20, size - position))
        if not chunk:
            return None
        stripped = chunk.lstrip(b"\0")
        if stripped:
            return position + (len(chunk) - len(stripped)) // BLOCK * BLOCK
        position += len(chunk)
    return None


def _next_header(f, offset: int, size: int) -> int | None:
    """The offset of the next block from ``offset`` on that is a valid tar header (its checksum
    holds), or None."""
    position = offset - offset % BLOCK
    f.seek(position)
    while position + BLOCK <= size:
        chunk = f.read(min(1 << 20, size - position))
        if not chunk:
            return None
        for i in range(0, len(chunk) - BLOCK + 1, BLOCK):
            block = chunk[i:i + BLOCK]
            if block.strip(b"\0"):
                try:
                    tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
                except tarfile.HeaderError:
                    continue
                return position + i
        position += len(chunk) - len(chunk) % BLOCK
    return None


def _read_parquet(fs, shard: Shard, options: ReadOptions) -> Iterator[Sample]:
    """One sample per row: the image bytes and key columns, the others in ``meta``."""
    path, uri = shard.paths[0], shard.uri
    image_column, key_column = options.image_column, options.key_column
    import pyarrow.parquet as pq

    with open_for_reading(path, fs, uri) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        missing = [c for c in (image_column, key_column) if c not in names]
        if missing:
            raise BadInput(f"{path} has no column {missing} (columns: {names}); set "
                             "--image-column / --key-column")
        row = 0
        for batch in parquet.iter_batches(batch_size=64):
            try:
                rows = batch.to_pylist()
            except (ValueError, OverflowError, ArithmeticError):  # a value Python cannot hold
                rows = None
            for i in range(batch.num_rows):
                sample = _parquet_sample(batch, i, rows, image_column, key_column)
                if sample.key is None or sample.key == "":
                    # Its own kind: never the string "None", never a clash with a real key.
                    sample = Sample(key="", error=f"{'null' if sample.key is None else 'empty'}"
                                    f" {key_column!r} at row {row}", error_kind="bad_key")
                yield sample
                row += 1


def _parquet_sample(batch, i: int, rows: list[dict] | None, image_column: str,
                    key_column: str) -> Sample:
    """Row ``i``: its key and image, the other columns as JSON-safe ``meta``. A side value that
    cannot be converted costs this sample (``bad_sidecar``), not the shard."""
    if rows is not None:  # the batch converted whole: the usual, fast case
        row = dict(rows[i])
        key, data = row.pop(key_column), row.pop(image_column)
    else:  # a value Python cannot hold is in this batch: find whose, row by row
        key = batch.column(key_column)[i].as_py()
        data = batch.column(image_column)[i].as_py()
    key = key if key is None else str(key)
    try:
        if rows is None:
            row = batch.slice(i, 1).drop_columns([key_column, image_column]).to_pylist()[0]
        meta = {k: json_value(v) for k, v in row.items()}
    except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
        return Sample(key=key, data=data,
                      meta_error=f"a side column cannot be read as JSON: {exc}")
    return Sample(key=key, data=data, meta=meta or None)


BINARY_INLINE = 1024  # side binary values up to this size go into meta as base64


def json_value(value: Any) -> Any:
    """A Parquet side value as JSON: dates and times as ISO 8601 text, decimals as text, binary
    as base64 (``"<N bytes>"`` above ``BINARY_INLINE``), durations in seconds, non-finite
    floats as text; lists, maps and structs element by element."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return (base64.b64encode(raw).decode("ascii") if len(raw) <= BINARY_INLINE
                else f"<{len(raw)} bytes>")
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    raise TypeError(f"no JSON form for a {type(value).__name__} value")


@dataclass(frozen=True)
class ReadOptions:
    """How to read the samples of a shard (``--image-column``, ``--key-column``,
    ``--max-image-bytes``)."""

    image_column: str = "image"
    key_column: str = "key"
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES


@dataclass(frozen=True)
class ShardFormat:
    """One input layout: which files are its shards, how to stream their samples and about how
    many rows a shard holds (``None``: cannot tell; the shard is then not sliced). Adding a
    format is one entry in ``SHARD_FORMATS`` (docs/development.md)."""

    name: str
    extensions: tuple[str, ...]
    read: Callable[[AbstractFileSystem, Shard, ReadOptions], Iterator[Sample]]
    estimate: Callable[[AbstractFileSystem, Shard, int], int | None]
    groups_files: bool = False  # loose files grouped into shards (else a file is a shard)


SHARD_FORMATS = {f.name: f for f in (
    ShardFormat("tar", (".tar",), _read_tar, _count_tar),
    ShardFormat("parquet", (".parquet",), _read_parquet, _count_parquet),
    ShardFormat("images", IMAGE_EXTENSIONS, _read_images, _count_images, groups_files=True),
)}
FORMATS = ("auto", *SHARD_FORMATS)


def format_of(path: str) -> str | None:
    """The format whose files end like ``path`` (None: not a shard)."""
    lower = path.lower()
    return next((f.name for f in SHARD_FORMATS.values() if lower.endswith(f.extensions)), None)


def _shard_format(shard: Shard) -> ShardFormat:
    try:
        return SHARD_FORMATS[shard.format]
    except KeyError:
        raise ValueError(f"unknown shard format {shard.format!r}") from None
