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

import fnmatch
import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.errors import BadInput
from pipeline.io.output import output_file_name, split_stem, stem_of
from pipeline.io.shards import Shard
from pipeline.io.storage import (
    filesystem,
    is_transient,
    protocol_of,
    read_bytes,
    redact,
    retry,
    write_bytes,
)

log = logging.getLogger("pipeline")

RECORD_VERSION = 2
DONE_DIR = "_done"
RECORD_BATCH = 256
RECORD_READERS = 8
# A shard whose read stopped for one of these reasons is redone by the next run.
SHARD_FAILURE_KINDS = ("shard_error", "storage", "missing_file")


INPUT_FILE = "_input.json"  # the input root whose results an output holds


def input_root(shards: list[Shard]) -> str:
    """Where the shards were listed (a glob's folder), as rows and records name URIs."""
    shard = shards[0]
    protocol = shard.uri.split("://", 1)[0] + "://" if "://" in shard.uri else ""
    root = shard.root.rstrip("/")
    return redact(root if "://" in root else protocol + root)


def claim_output(output: str, root: str, force: bool,
                 storage_options: Mapping[str, Any] | None = None) -> None:
    """An output holds the results of one input root: a run reading another one (whose shard
    names may well be the same, ``faces-00000``...) would overwrite them file by file. Refused
    (``ValueError``: exit 2) unless ``force``; the first run records its root."""
    uri = f"{output.rstrip('/')}/{INPUT_FILE}"
    try:
        recorded = json.loads(read_bytes(uri, storage_options)).get("input_root")
    except FileNotFoundError:
        recorded = None
    if recorded and recorded != root and not force:
        raise BadInput(
            f"{redact(output)} holds the results of the input {recorded}, and this run reads "
            f"{root}: its files would replace those of the same names. Give this input "
            "another --output, or pass --force to give this output to the new input (every "
            "shard is redone; the old input's other files stay)")
    if recorded != root:
        write_bytes(uri, json.dumps({"input_root": root}).encode(), storage_options)


def settings_id(settings: Mapping[str, Any]) -> str:
    """A short hash of everything besides the input and the model that changes the rows."""
    text = json.dumps({"record_version": RECORD_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_completion_record(
    output: str, shard: Shard, stem: str, piece: int, first_row: int, last: bool, rows: int,
    errors: int, shard_failed: bool, model_version: str, settings: str,
    storage_options: Mapping[str, Any] | None = None, images: int | None = None,
) -> None:
    """Record that piece ``stem``'s output file is committed; call only after writing it.
    ``rows``: the file's rows; ``images``: the input samples they are for (fewer when images
    were searched for faces and some had several)."""
    record = {
        "record_version": RECORD_VERSION,
        "shard": shard.uri,
        "shard_fingerprint": shard.fingerprint,
        "file": output_file_name(stem),
        "piece": piece,
        "first_row": first_row,
        "last": last,
        "rows": rows,
        "images": rows if images is None else images,
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


def list_output(output: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Every file under ``output``, relative to it (empty when it does not exist yet): one
    recursive listing, which a run makes once and hands to ``completed_pieces`` and
    ``retire_stale_outputs``."""
    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/")
    try:
        found = retry(lambda: fs.find(root), output, "listing the output")
    except FileNotFoundError:
        return set()
    return {posixpath.relpath(p, root) for p in found}


def _read_records(fs, output: str, paths: list[str]) -> dict[str, Any]:
    """``{path: bytes or exception}`` for completion records, in one request (a record gone
    since the listing stays an exception; a transient failure is retried on its own)."""
    raw = retry(lambda: fs.cat(paths, on_error="return"), output, "reading completion records")
    for path, value in raw.items():
        if isinstance(value, Exception) and is_transient(value):
            raw[path] = retry(lambda p=path: fs.cat_file(p), path, "reading a record")
    return raw


def completed_pieces(
    output: str, shards: list[Shard], model_version: str, settings: str,
    storage_options: Mapping[str, Any] | None = None, present: set[str] | None = None,
) -> dict[str, ShardProgress]:
    """``{shard name: ShardProgress}`` for the shards with at least one piece done
    (``present``: the output's listing, when the caller has it)."""
    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/")
    if present is None:
        present = list_output(output, storage_options)
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
        return _read_records(fs, output, [path for _, _, path in batch])

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
                progress.rows += int(record.get("images", record.get("rows", 0)))
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


RETIRED_DIR = "_retired"


def retire_stale_outputs(output: str, input_uri: str, shards: list[Shard], model_version: str,
                         settings: str, run_id: str, failed: set[str] = frozenset(),
                         storage_options: Mapping[str, Any] | None = None,
                         present: set[str] | None = None) -> list[str]:
    """Move the output files that the current listing no longer produces, with their records,
    to ``OUTPUT/_retired/<run_id>/`` (where dataset readers do not look), so that no key is in
    two output files. Called after a run that completed.

    Stale: a file whose input shard is gone though it lies where this run listed (a deleted tar,
    a loose-image group that no longer exists), a file a listed shard wrote under the name an
    older release gave it (``shards.shard_name``), and a later piece of a listed shard that this
    run's layout does not have (its record is for other input bytes, model or settings). A file
    from somewhere this run did not list (another input, a narrower glob) is left alone, as is
    every file of a shard that failed this run (``failed``: shard names).

    ``present``, the output's listing from the start of the run, is enough: a file this run
    wrote belongs to the current layout, so only files listed before can be stale."""
    fs, root = filesystem(output, storage_options)
    root = root.rstrip("/")
    if present is None:
        present = list_output(output, storage_options)
    by_name = {s.name: s for s in shards}
    by_uri = {s.uri: s for s in shards}
    candidates = []  # (stem, shard or None)
    for rel in present:
        stem = None if "/" in rel else stem_of(rel)
        if stem is None:
            continue
        found = split_stem(stem, by_name)
        if found is None:
            candidates.append((stem, None))
        elif found[1] > 0 and found[0] not in failed:
            candidates.append((stem, by_name[found[0]]))
    if not candidates:
        return []
    paths = [f"{root}/{DONE_DIR}/{stem}.json" for stem, _ in candidates]
    raw = _read_records(fs, output, paths)
    covered = _listed_here(redact(input_uri))  # records name shards without URL secrets
    stale = []
    for (stem, shard), path in zip(candidates, paths, strict=True):
        record = _parse(raw.get(path))
        if record is None:
            continue  # no record: not ours to judge
        if shard is None:  # no listed shard writes this name (any more)
            uri = str(record.get("shard", ""))
            renamed = by_uri.get(uri)  # listed, under another name now (an older naming)
            if covered(uri) and (renamed is None or renamed.name not in failed):
                stale.append(stem)
        elif (record.get("shard_fingerprint") != shard.fingerprint
              or record.get("model_version") != model_version
              or record.get("settings") != settings):
            stale.append(stem)
    target = f"{root}/{RETIRED_DIR}/{run_id}"
    for folder in ((target, f"{target}/{DONE_DIR}") if stale else ()):
        fs.makedirs(folder, exist_ok=True)
    for stem in stale:
        for rel in (output_file_name(stem), f"{DONE_DIR}/{stem}.json"):
            if rel in present:
                retry(lambda r=rel: fs.mv(f"{root}/{r}", f"{target}/{r}"), output,
                      "retiring a stale output file")
    if stale:
        log.warning("retired %d output file(s) the input no longer produces (e.g. %s) to "
                    "%s/%s/%s/", len(stale), output_file_name(stale[0]), output, RETIRED_DIR,
                    run_id)
    return stale


def _listed_here(input_uri: str):
    """Whether a shard URI lies where a listing of ``input_uri`` looks."""
    base = input_uri.rstrip("/")
    if any(c in base for c in "*?["):
        return lambda uri: fnmatch.fnmatchcase(uri, base) or fnmatch.fnmatchcase(
            uri, base.split("://", 1)[-1])
    return lambda uri: (uri == base or uri.startswith(base + "/")
                        or uri.split("://", 1)[-1] == base.split("://", 1)[-1]
                        or uri.split("://", 1)[-1].startswith(base.split("://", 1)[-1] + "/"))
