"""The output Parquet files: their names and the atomic commit (their columns:
``pipeline.io.rows``).

One file per piece (an input shard, or a ``rows_per_file`` chunk of a big one: see
``pipeline.stages.units``), ``part-<stem>.parquet``, one row per input sample in input order, or,
for a sample searched for faces, one row per face found (``face`` 0, 1, ... by descending score).
Committing goes through ``pipeline.io.storage.write_bytes``: a hidden temporary file renamed into
place locally, a single PUT of the finished bytes on object stores. Either way a reader never sees a
partial file, and a rerun replaces the file instead of adding one.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.shards import CHUNK_NAME
from pipeline.io.storage import write_bytes

# Output names are made and parsed here only: part-<stem>.parquet, a stem being a shard's name
# (piece 0) or <shard name>.c<k:05d> (piece k of a big shard).
PREFIX, SUFFIX = "part-", ".parquet"


def output_file_name(stem: str) -> str:
    return f"{PREFIX}{stem}{SUFFIX}"


def stem_of(file_name: str) -> str | None:
    """The stem of an output file's name (``part-<stem>.parquet``), or None for any other."""
    if file_name.startswith(PREFIX) and file_name.endswith(SUFFIX):
        return file_name[len(PREFIX):-len(SUFFIX)] or None
    return None


def shard_of(stem: str) -> str:
    """The shard name a stem belongs to, without the list of shards (a later piece's stem
    names its shard; any other stem is a shard's name)."""
    match = CHUNK_NAME.fullmatch(stem)
    return match.group(1) if match else stem


def piece_stem(shard_name: str, index: int) -> str:
    """The output name stem of piece ``index`` of a shard (the shard's own name for piece 0)."""
    return shard_name if index == 0 else f"{shard_name}.c{index:05d}"


def split_stem(stem: str, shard_names: Mapping[str, object] | set[str]) -> tuple[str, int] | None:
    """``(shard name, piece index)`` for an output stem, or None when no listed shard has it."""
    if stem in shard_names:
        return stem, 0
    match = CHUNK_NAME.fullmatch(stem)
    if match and match.group(1) in shard_names:
        return match.group(1), int(match.group(2))
    return None


def write_table_atomic(
    table: pa.Table, uri: str, storage_options: Mapping[str, Any] | None = None
) -> int:
    """Write ``table`` as Parquet at ``uri``: readers see the old file or the whole new one.
    Returns the file's size in bytes."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()
    write_bytes(uri, data, storage_options)
    return len(data)
