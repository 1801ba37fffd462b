"""The output Parquet files: schema, names, and the atomic commit.

One file per piece (an input shard, or a ``rows_per_file`` chunk of a big one: see
``pipeline.stages.units``), ``part-<stem>.parquet``, one row per input sample in input order, or,
for a sample searched for faces, one row per face found (``face`` 0, 1, ... by descending score).
Committing goes through ``pipeline.io.storage.write_bytes``: a hidden temporary file renamed into
place locally, a single PUT of the finished bytes on object stores. Either way a reader never sees a
partial file, and a rerun replaces the file instead of adding one.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.shards import CHUNK_NAME
from pipeline.io.storage import write_bytes
from pipeline.model.geometry import NUM_LANDMARKS

# A row's status: landmarks found (ok), an image searched for faces without one (no_face: an
# answer, not an error), or an error (error and error_kind say which).
STATUS_OK, NO_FACE, STATUS_ERROR = "ok", "no_face", "error"
STATUSES = (STATUS_OK, NO_FACE, STATUS_ERROR)
LANDMARKS_TYPE = pa.list_(pa.list_(pa.float32(), 2), NUM_LANDMARKS)
FACE_POINTS = 5  # the detector's keypoints: eyes, nose tip, mouth corners
SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("bbox", pa.list_(pa.float32(), 4)),
        pa.field("face", pa.int16()),
        pa.field("face_score", pa.float32()),
        pa.field("face_box", pa.list_(pa.float32(), 4)),
        pa.field("face_points", pa.list_(pa.list_(pa.float32(), 2), FACE_POINTS)),
        pa.field("crop", pa.list_(pa.float32(), 4)),
        pa.field("landmarks", LANDMARKS_TYPE),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("error_kind", pa.string()),
        pa.field("meta", pa.string()),
    ]
)


def output_file_name(stem: str) -> str:
    return f"part-{stem}.parquet"


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


def _nullable_strings(values: Sequence[str]) -> pa.Array:
    return pa.array([v if v else None for v in values], type=pa.string())


def _fixed_lists(values: np.ndarray, size: int, valid: np.ndarray) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), pa.float32())
    mask = None if valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(flat, size, mask=mask)


def rows_to_table(rows: Mapping[str, np.ndarray]) -> pa.Table:
    """Predictor output rows of one piece (in input order) -> a table in ``SCHEMA``."""
    n = len(rows["key"])
    ok = np.asarray([not e for e in rows["error"]], dtype=bool)
    # An image searched and found without a face is an answer, not an error: between the stages
    # it travels as error_kind no_face; in the file it is status no_face with no error, so
    # that `WHERE error IS NULL` keeps it and `WHERE status = 'ok'` gives the landmarks.
    no_face = np.asarray([k == NO_FACE for k in rows["error_kind"]], dtype=bool)
    status = np.where(ok, STATUS_OK, np.where(no_face, NO_FACE, STATUS_ERROR))
    errors = [e if not n else "" for e, n in zip(rows["error"], no_face, strict=True)]
    kinds = [k if not n else "" for k, n in zip(rows["error_kind"], no_face, strict=True)]
    has_size = np.asarray(rows["width"]) > 0
    has_bbox = ~np.isnan(np.asarray(rows["bbox"], dtype=np.float32)).any(axis=1)
    crop = np.asarray(rows["crop"], dtype=np.float64).reshape(n, 3)
    crop_box = np.concatenate([crop[:, :2], crop[:, :2] + crop[:, 2:3]], axis=1)
    landmarks = np.asarray(rows["landmarks"], dtype=np.float32).reshape(n, NUM_LANDMARKS, 2)
    points = _fixed_lists(np.nan_to_num(landmarks), 2, np.ones(n * NUM_LANDMARKS, dtype=bool))
    landmark_lists = pa.FixedSizeListArray.from_arrays(
        points, NUM_LANDMARKS, mask=None if ok.all() else pa.array(~ok))
    score = np.asarray(rows["face_score"], dtype=np.float32)
    detected = np.isfinite(score)
    points = np.nan_to_num(np.asarray(rows["face_points"], np.float32).reshape(n, FACE_POINTS, 2))
    columns = {
        "key": pa.array([str(k) for k in rows["key"]], pa.string()),
        "shard": pa.array([str(s) for s in rows["shard"]], pa.string()),
        "width": pa.array(np.asarray(rows["width"], np.int32), mask=~has_size),
        "height": pa.array(np.asarray(rows["height"], np.int32), mask=~has_size),
        "bbox": _fixed_lists(np.nan_to_num(rows["bbox"]), 4, has_bbox),
        "face": pa.array(np.asarray(rows["face"], np.int16), mask=~detected),
        "face_score": pa.array(np.nan_to_num(score), mask=~detected),
        "face_box": _fixed_lists(np.nan_to_num(rows["face_box"]), 4, detected),
        "face_points": pa.FixedSizeListArray.from_arrays(
            _fixed_lists(points, 2, np.ones(n * FACE_POINTS, dtype=bool)), FACE_POINTS,
            mask=None if detected.all() else pa.array(~detected)),
        "crop": _fixed_lists(np.nan_to_num(crop_box), 4, ok),
        "landmarks": landmark_lists,
        "model_version": pa.array([str(v) for v in rows["model_version"]], pa.string()),
        "status": pa.array(status.tolist(), pa.string()),
        "error": _nullable_strings(errors),
        "error_kind": _nullable_strings(kinds),
        "meta": _nullable_strings(rows["meta"]),
    }
    return pa.table(columns, schema=SCHEMA)


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
