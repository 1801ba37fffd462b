"""Completion records and resume: a rerun redoes only the shards that are not done.

Each committed output file ``part-<shard>.parquet`` gets ``_done/<shard>.json``, written after
the data (so its presence means the data is whole). A shard counts as done for a rerun when its
record names the same input shard with the same size/ETag fingerprint, the same model version
and the same result-affecting settings, its read finished (no shard-level error), and its
output file is there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Mapping
from typing import Any

from pipeline.output import output_file_name
from pipeline.shards import Shard
from pipeline.storage import filesystem, protocol_of, retry, write_bytes

log = logging.getLogger("pipeline")

RECORD_VERSION = 1
DONE_DIR = "_done"
# A shard whose read stopped for one of these reasons is redone by the next run.
SHARD_FAILURE_KINDS = ("shard_error", "storage", "missing_file")


def settings_id(settings: Mapping[str, Any]) -> str:
    """A short hash of everything besides the input and the model that changes the rows."""
    text = json.dumps({"record_version": RECORD_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_completion_record(
    output: str, shard: Shard, rows: int, errors: int, shard_failed: bool, model_version: str,
    settings: str, storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Record that ``shard``'s output file is committed; call only after writing it."""
    record = {
        "record_version": RECORD_VERSION,
        "shard": shard.uri,
        "shard_fingerprint": shard.fingerprint,
        "file": output_file_name(shard.name),
        "rows": rows,
        "errors": errors,
        "complete": not shard_failed,
        "model_version": model_version,
        "settings": settings,
    }
    uri = f"{output.rstrip('/')}/{DONE_DIR}/{shard.name}.json"
    write_bytes(uri, json.dumps(record, indent=1).encode(), storage_options)


def completed_shards(
    output: str, shards: list[Shard], model_version: str, settings: str,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, dict]:
    """``{shard name: record}`` of the shards a rerun may skip (one listing of the output,
    then the records read in one batched call)."""
    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/")
    try:
        present = {posixpath.relpath(p, root) for p in retry(lambda: fs.find(root), output)}
    except FileNotFoundError:
        return {}
    wanted = [s for s in shards if f"{DONE_DIR}/{s.name}.json" in present
              and output_file_name(s.name) in present]
    if not wanted:
        return {}
    paths = [f"{root}/{DONE_DIR}/{s.name}.json" for s in wanted]
    raw = retry(lambda: fs.cat(paths), output, "reading completion records")
    done = {}
    for shard, path in zip(wanted, paths, strict=True):
        try:
            record = json.loads(raw[path])
        except (KeyError, ValueError):
            continue  # unreadable record: redo the shard
        if (record.get("shard") == shard.uri
                and record.get("shard_fingerprint") == shard.fingerprint
                and record.get("model_version") == model_version
                and record.get("settings") == settings
                and record.get("complete") is True):
            done[shard.name] = record
    return done


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
