"""The commit stage, free of Ray: write one piece's rows as its Parquet file, then its record.

Runs in a Ray worker (``pipeline.backend.executor``), never in the driver. Its input is the
predicted units that hold the piece's rows and, per unit, the row range that belongs to the piece;
its output is a small receipt for the driver (file, rows, errors by kind, bytes, seconds).
Committing the same piece twice (a retried task) writes the same bytes under the same name.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.io.lease import LEASE_FILE, check_token
from pipeline.io.output import output_file_name, piece_stem, write_table_atomic
from pipeline.io.report import face_score_counts
from pipeline.io.resume import SHARD_FAILURE_KINDS, write_completion_record
from pipeline.io.rows import NO_FACE, rows_to_table
from pipeline.io.shards import Shard
from pipeline.stages.faults import FaultPlan


@dataclass(frozen=True)
class PieceSpec:
    """Everything a commit needs besides the rows: where, what, and for which model."""

    output: str
    shard: Shard
    piece: int
    first_row: int
    last: bool
    model_version: str
    settings: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    faults: str = ""
    lease_token: str = ""  # the run's lease token: its record is written only while it holds

    @property
    def stem(self) -> str:
        return piece_stem(self.shard.name, self.piece)


@dataclass(frozen=True)
class CommitSettings:
    """What every piece of one run shares: a commit stage builds each piece's spec from it."""

    output: str
    model_version: str
    settings: str
    rows_per_file: int
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    faults: str = ""
    lease_token: str = ""

    def spec(self, shard: Shard, piece: int, last: bool) -> PieceSpec:
        return PieceSpec(self.output, shard, piece, piece * self.rows_per_file, last,
                         self.model_version, self.settings, dict(self.storage_options),
                         self.faults, self.lease_token)


def rows_nbytes(rows: Mapping[str, Any]) -> int:
    """About the bytes ``rows`` take when shipped: arrays' buffers, and the payload of each
    bytes or str value in object arrays."""
    total = 0
    for value in rows.values():
        array = np.asarray(value)
        if array.dtype == object:
            total += sum(len(v) for v in array.ravel() if isinstance(v, (bytes, str)))
        else:
            total += array.nbytes
    return total


def gather(units: Sequence[Mapping[str, np.ndarray]],
           ranges: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """The rows ``ranges[i]`` of ``units[i]``, concatenated in order."""
    parts = [{k: np.asarray(v)[a:b] for k, v in unit.items()}
             for unit, (a, b) in zip(units, ranges, strict=True)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def commit_piece(spec: PieceSpec, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Write ``rows`` (the piece's predicted rows, in order) as ``part-<stem>.parquet``, then
    its completion record; return the receipt."""
    started, cpu = time.time(), time.thread_time()
    uri = f"{spec.output.rstrip('/')}/{output_file_name(spec.stem)}"
    table = rows_to_table(rows)
    kinds: dict[str, int] = {}
    for kind in table.column("error_kind").to_pylist():
        if kind:
            kinds[kind] = kinds.get(kind, 0) + 1
    # An image searched and found without a face is an answer, not a failure: counted apart.
    no_face = table.column("status").to_pylist().count(NO_FACE)
    images = int(np.count_nonzero(np.asarray(rows["face"]) == 0))
    faces = int(np.count_nonzero(np.isfinite(np.asarray(rows["face_score"], np.float32))))
    scores = face_score_counts(rows["face_score"]) if faces else None
    # A row without a key is the shard's own error: the read stopped, so a rerun redoes it.
    shard_failed = any(not key and kind in SHARD_FAILURE_KINDS
                       for key, kind in zip(rows["key"], rows["error_kind"], strict=True))
    size = write_table_atomic(table, uri, spec.storage_options)
    FaultPlan(spec.faults).at_commit(spec.stem)
    errors = sum(kinds.values())
    if spec.lease_token:  # fencing: a run that lost the output's lease records nothing more
        check_token(f"{spec.output.rstrip('/')}/{LEASE_FILE}", spec.lease_token,
                    spec.storage_options)
    # The record that says the piece is done goes last, after its data is committed.
    write_completion_record(spec.output, spec.shard, spec.stem, spec.piece, spec.first_row,
                            spec.last, table.num_rows, errors, shard_failed, spec.model_version,
                            spec.settings, spec.storage_options, images=images)
    return {
        "file": output_file_name(spec.stem),
        "shard": spec.shard.name,
        "piece": spec.piece,
        "last": spec.last,
        "rows": table.num_rows,
        "images": images,
        "faces": faces,
        "no_face": no_face,
        **({"face_scores": scores} if scores else {}),
        "errors": errors,
        "errors_by_kind": kinds,
        "shard_failed": shard_failed,
        "bytes": size,
        "seconds": round(time.time() - started, 4),
        "cpu_s": round(time.thread_time() - cpu, 4),
        "at": round(time.time(), 3),  # committed (epoch seconds): rows/s over the run
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }
