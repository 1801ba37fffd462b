"""Completion records and resume: a rerun redoes only the pieces that are not done.

Each committed output file ``part-<stem>.parquet`` gets ``_done/<stem>.json``, written after the
data (so its presence means the data is whole). A piece (``pipeline.stages.units``) counts as done
for a rerun when its record names the same input shard with the same size/ETag fingerprint, the same
model version and the same result-affecting settings, its read finished (no shard-level error), and
its output file is there. A shard is skipped without being read when its last piece and every piece
before it are done; otherwise its read task reads past the done pieces.

The check costs one listing of the output and reads of the records that match listed shards, in
batches of ``RECORD_BATCH`` that are retried on their own and run a few at a time: a transient
error costs one batch's retry, never the whole check, and a million records do not travel in
one request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.io.output import output_file_name, split_stem
from pipeline.io.shards import Shard
from pipeline.io.storage import filesystem, is_transient, protocol_of, retry, write_bytes

log = logging.getLogger("pipeline")

RECORD_VERSION = 2
DONE_DIR = "_done"
RECORD_BATCH = 256
RECORD_READERS = 8
# A shard whose read stopped for one of these reasons is redone by the next run.
SHARD_FAILURE_KINDS = ("shard_error", "storage", "missing_file")


def settings_id(settings: Mapping[str, Any]) -> str:
    """A short hash of everything besides the input and the model that changes the rows."""
    text = json.dumps({"record_version": RECORD_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_completion_record(
    output: str, shard: Shard, stem: str, piece: int, first_row: int, last: bool, rows: int,
    errors: int, shard_failed: bool, model_version: str, settings: str,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Record that piece ``stem``'s output file is committed; call only after writing it."""
    record = {
        "record_version": RECORD_VERSION,
        "shard": shard.uri,
        "shard_fingerprint": shard.fingerprint,
        "file": output_file_name(stem),
        "piece": piece,
        "first_row": first_row,
        "last": last,
        "rows": rows,
        "errors": errors,
        "complete": not shard_failed,
        "model_version": model_version,
        "settings": settings,
    }
    uri = f"{output.rstrip('/')}/{DONE_DIR}/{stem}.json"
    write_bytes(uri, json.dumps(record, indent=1).encode(), storage_options)


@dataclass
class ShardProgress:
    """The pieces of one shard that an earlier run committed for this model and settings."""

    pieces: set[int] = field(default_factory=set)
    last_piece: int | None = None
    rows: int = 0
    errors: int = 0

    @property
    def finished(self) -> bool:
        """Every piece up to and including the shard's last one is done."""
        return self.last_piece is not None and all(
            p in self.pieces for p in range(self.last_piece + 1))


def completed_pieces(
    output: str, shards: list[Shard], model_version: str, settings: str,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, ShardProgress]:
    """``{shard name: ShardProgress}`` for the shards with at least one piece done."""
    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/")
    try:
        present = {posixpath.relpath(p, root) for p in retry(lambda: fs.find(root), output,
                                                             "listing the output")}
    except FileNotFoundError:
        return {}
    by_name = {s.name: s for s in shards}
    wanted: list[tuple[Shard, int, str]] = []
    for rel in present:
        folder, base = posixpath.split(rel)
        if folder != DONE_DIR or not base.endswith(".json") or base.startswith("."):
            continue
        stem = base[: -len(".json")]
        found = split_stem(stem, by_name)
        if found and output_file_name(stem) in present:
            wanted.append((by_name[found[0]], found[1], f"{root}/{rel}"))
    if not wanted:
        return {}
    batches = [wanted[i : i + RECORD_BATCH] for i in range(0, len(wanted), RECORD_BATCH)]
    if len(batches) > 1:
        log.info("reading %d completion records in %d batches", len(wanted), len(batches))

    def read(batch):
        paths = [path for _, _, path in batch]
        raw = retry(lambda: fs.cat(paths, on_error="return"), output,
                    "reading completion records")
        for path, value in raw.items():  # a record gone since the listing stays an exception
            if isinstance(value, Exception) and is_transient(value):
                raw[path] = retry(lambda p=path: fs.cat_file(p), path, "reading a record")
        return raw

    done: dict[str, ShardProgress] = {}
    with ThreadPoolExecutor(RECORD_READERS) as pool:
        for batch, raw in zip(batches, pool.map(read, batches), strict=True):
            for shard, piece, path in batch:
                record = _parse(raw.get(path))
                if (record is None or record.get("shard") != shard.uri
                        or record.get("shard_fingerprint") != shard.fingerprint
                        or record.get("model_version") != model_version
                        or record.get("settings") != settings
                        or record.get("piece") != piece
                        or record.get("complete") is not True):
                    continue
                progress = done.setdefault(shard.name, ShardProgress())
                progress.pieces.add(piece)
                progress.rows += int(record.get("rows", 0))
                progress.errors += int(record.get("errors", 0))
                if record.get("last") is True:
                    progress.last_piece = piece
    return done


def _parse(raw) -> dict | None:
    if not isinstance(raw, (bytes, str)):
        return None  # missing or unreadable (on_error="return" gives the exception): redo it
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def remove_stale_temporary_files(output: str) -> int:
    """Local output: delete the hidden temporary files a killed run left behind."""
    if protocol_of(output) not in ("file", "local"):
        return 0  # object stores: whole-object PUTs leave nothing half-written
    _, root = filesystem(output)
    removed = 0
    for folder in (root, os.path.join(root, DONE_DIR)):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith(".") and ".tmp-" in name:
                os.remove(os.path.join(folder, name))
                removed += 1
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    return removed
