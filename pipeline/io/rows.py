"""The row schema, declared once: every column a row carries between the stages or in the files.

Each ``Column`` says who makes it (``read``: the read stage, ``predict``: the predict stage,
``write``: derived when a piece is written), how it travels between the stages (a numpy dtype,
a per-row shape and the value of a row that has none), how it is written (an Arrow type, and
when it is null), and what it means. From this one list come:

- ``empty_rows``: the arrays a read task fills (``pipeline.stages.reader``);
- ``TRAVEL_ONLY``: what the predictor drops (image bytes and pixels are not written);
- ``SCHEMA`` and ``rows_to_table``: the Parquet files (``pipeline.io.output``);
- ``SCHEMA_ID``: part of the settings id, so a release that changes the columns rewrites the
  files an older one wrote (``pipeline.inference.config.InferConfig.result_settings``);
- ``readme_table``: the README's "Output schema" table (``tests/test_output.py`` checks it).

Adding a column is one ``Column`` here plus the code that computes it (docs/development.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.model.geometry import INPUT_SIZE, NUM_LANDMARKS

# A row's status: landmarks found (ok), an image searched for faces without one (no_face: an
# answer, not an error), or an error (error and error_kind say which).
STATUS_OK, NO_FACE, STATUS_ERROR = "ok", "no_face", "error"
FACE_POINTS = 5  # the detector's keypoints: eyes, nose tip, mouth corners
# What a row's error_kind holds (and the end-of-run summary counts errors by).
ERROR_KINDS = (
    "empty",          # a 0-byte image
    "decode",         # not an image, truncated, broken CRC, unsupported
    "too_large",      # above --max-pixels, refused before decoding
    "bad_sidecar",    # the .json sidecar is not a JSON object
    "bad_bbox",       # the face box is malformed, empty, inverted or outside the image
    "no_image",       # a key whose members hold no image
    "duplicate_key",  # a key seen earlier in the same shard, or a key's second image
    "bad_key",        # a null or empty key (Parquet), a tar member without a file name stem
    "unsupported_member",  # a tar link, device or FIFO member: not followed, not read
    "missing_file",   # listed, then gone before it was read
    "storage",        # read failed for good (access denied, retries exhausted)
    "shard_error",    # the shard itself is damaged or unreadable: rows after it are lost
    "nonfinite_output",  # the model gave NaN or inf for a good input (broken weights)
    "no_face",        # searched for faces (--detect) and none found: counted apart, not an error
    "invalid",        # anything else wrong with the sample
)
# no_face travels between the stages as a kind (see _status); in the file it is a status.
ERROR_KINDS_TEXT = ", ".join(f"`{k}`" for k in ERROR_KINDS if k != NO_FACE)

Rows = Mapping[str, np.ndarray]
Rule = Callable[[Rows, np.ndarray], np.ndarray]  # (rows, the column's file values) -> null rows


def _never(rows: Rows, values: np.ndarray) -> np.ndarray:
    return np.zeros(len(values), dtype=bool)


def _blank(rows: Rows, values: np.ndarray) -> np.ndarray:
    return np.asarray([not v for v in values], dtype=bool)


def _size_unknown(rows: Rows, values: np.ndarray) -> np.ndarray:
    return np.asarray(rows["width"]) <= 0


def _any_nan(rows: Rows, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    return np.isnan(values.reshape(len(values), int(np.prod(values.shape[1:])))).any(axis=1)


def _not_detected(rows: Rows, values: np.ndarray) -> np.ndarray:
    return ~np.isfinite(np.asarray(rows["face_score"], dtype=np.float32))


def _not_ok(rows: Rows, values: np.ndarray) -> np.ndarray:
    return np.asarray([bool(e) for e in rows["error"]], dtype=bool)


def _no_face(rows: Rows) -> np.ndarray:
    return np.asarray([k == NO_FACE for k in rows["error_kind"]], dtype=bool)


# File values that differ from the values between the stages. Between the stages a no_face row
# travels as an error of kind no_face (stages pass it on like one); in the file it is status
# no_face with no error, so that `WHERE error IS NULL` keeps it.
def _status(rows: Rows) -> np.ndarray:
    ok = ~_not_ok(rows, rows["error"])
    return np.where(ok, STATUS_OK, np.where(_no_face(rows), NO_FACE, STATUS_ERROR)).astype(object)


def _unless_no_face(name: str) -> Callable[[Rows], np.ndarray]:
    def values(rows: Rows) -> np.ndarray:
        return np.where(_no_face(rows), "", np.asarray(rows[name], dtype=object)).astype(object)
    return values


def _crop_box(rows: Rows) -> np.ndarray:
    """``x0, y0, side`` (between the stages: what the crop code takes) -> ``x0, y0, x1, y1``."""
    crop = np.asarray(rows["crop"], dtype=np.float64).reshape(-1, 3)
    return np.concatenate([crop[:, :2], crop[:, :2] + crop[:, 2:3]], axis=1)


@dataclass(frozen=True)
class Column:
    """One column. ``dtype`` None: only in the files; ``arrow`` None: never written."""

    name: str
    made_by: str  # "read", "predict" or "write"
    meaning: str  # for the files (README) when written, else for the stages
    dtype: str | None = None  # numpy dtype between the stages
    shape: tuple[int, ...] = ()  # per row
    fill: object = None  # a row's value before a stage sets it
    arrow: pa.DataType | None = None
    null: Rule = _never  # which rows are null in the file
    file_value: Callable[[Rows], np.ndarray] | None = None  # the file's values, when derived
    decode: tuple[str, ...] = ("cpu", "gpu")  # the --decode modes whose units carry it

    def empty(self, n: int) -> np.ndarray:
        if self.dtype == "object":
            return np.full(n, self.fill, dtype=object)
        return np.full((n, *self.shape), self.fill, dtype=self.dtype)


def _points(n: int) -> pa.DataType:
    return pa.list_(pa.list_(pa.float32(), 2), n)


BOX = pa.list_(pa.float32(), 4)
LANDMARKS_TYPE = _points(NUM_LANDMARKS)

COLUMNS: tuple[Column, ...] = (
    Column("key", "read", 'sample key (`""` for a row that reports a shard-level read error)',
           "object", fill="", arrow=pa.string()),
    Column("shard", "read", "input shard URI (the folder, for loose images)", "object", fill="",
           arrow=pa.string()),
    Column("width", "read", "width of the EXIF-oriented image; null when unknown (on error)",
           "int32", fill=0, arrow=pa.int32(), null=_size_unknown),
    Column("height", "read", "height of the EXIF-oriented image; null as `width`", "int32",
           fill=0, arrow=pa.int32(), null=_size_unknown),
    Column("bbox", "read", "the input face box `x0, y0, x1, y1`; null when none", "float32",
           (4,), np.nan, BOX, _any_nan),
    Column("face", "read",
           "the face's index in its image, by descending detector score; null for an image "
           "that was not searched for faces (it had a box), where none was found, or on error",
           "int16", fill=0, arrow=pa.int16(), null=_not_detected),
    Column("face_score", "read",
           "the detector's score of this face; null when the image was not searched or no face "
           "was found", "float32", fill=np.nan, arrow=pa.float32(), null=_not_detected),
    Column("face_box", "read",
           "the detector's box `x0, y0, x1, y1` in pixels of the oriented image; null as "
           "`face_score`", "float32", (4,), np.nan, BOX, _not_detected),
    Column("face_points", "read",
           "the detector's 5 keypoints (the eye centres, the nose tip, the mouth corners); null "
           "as `face_score`", "float32", (FACE_POINTS, 2), np.nan, _points(FACE_POINTS),
           _not_detected),
    Column("crop", "read",
           "the square the model saw, `x0, y0, x1, y1` in source pixels; null on error "
           "(between the stages `x0, y0, side`)", "float64", (3,), np.nan, BOX, _not_ok,
           _crop_box),
    Column("landmarks", "predict",
           "68 `(x, y)` in pixels of the oriented source image, iBUG order; null on error",
           "float32", (NUM_LANDMARKS, 2), np.nan, LANDMARKS_TYPE, _not_ok),
    Column("model_version", "predict", "16 hex digits of the sha256 of the model's weights",
           "object", fill="", arrow=pa.string()),
    Column("status", "write",
           "`ok` (landmarks found), `no_face` (searched for faces, none found: an answer, with "
           "the image's size, not an error) or `error`", arrow=pa.string(), file_value=_status),
    Column("error", "read",
           "null unless `status` is `error`, otherwise what was wrong (`cannot decode image: …`, "
           "`no image member for key …`, `bbox … is empty or inverted`, `shard error after N "
           "samples: …`, …)", "object", fill="", arrow=pa.string(), null=_blank,
           file_value=_unless_no_face("error")),
    Column("error_kind", "read",
           f"null when fine, else one of {ERROR_KINDS_TEXT} (null unless `status` is `error`)",
           "object", fill="", arrow=pa.string(), null=_blank,
           file_value=_unless_no_face("error_kind")),
    Column("meta", "read", "the sidecar JSON (Parquet: the other columns), null when none",
           "object", fill="", arrow=pa.string(), null=_blank),
    # Between the stages only: the image, as pixels or as its file's bytes.
    Column("pixels", "read", "the model input, zeros on error rows", "uint8",
           (INPUT_SIZE, INPUT_SIZE, 3), 0, decode=("cpu",)),
    Column("encoded", "read", "the image file's bytes", "object", fill=b"", decode=("gpu",)),
    Column("orientation", "read", "its EXIF orientation 1..8", "int8", fill=1, decode=("gpu",)),
    Column("stored_size", "read", "its width, height before orientation", "int32", (2,), 0,
           decode=("gpu",)),
    Column("on_device", "read", "the device decoder takes it", "bool", fill=False,
           decode=("gpu",)),
    Column("find_faces", "read", "the predictor finds its faces", "bool", fill=False,
           decode=("gpu",)),
)
BY_NAME = {c.name: c for c in COLUMNS}
WRITTEN = tuple(c for c in COLUMNS if c.arrow is not None)
# Read by the predictor, never written: the predictor drops them.
TRAVEL_ONLY = tuple(c.name for c in COLUMNS if c.arrow is None)
SCHEMA = pa.schema([pa.field(c.name, c.arrow, nullable=c.null is not _never) for c in WRITTEN])


def schema_id(schema: pa.Schema) -> str:
    """16 hex digits that change with any column's name, type or nullability."""
    fields = [[f.name, str(f.type), f.nullable] for f in schema]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


SCHEMA_ID = schema_id(SCHEMA)


def empty_rows(n: int, decode: str = "cpu") -> dict[str, np.ndarray]:
    """``n`` rows as the read stage makes them, before it fills them in."""
    return {c.name: c.empty(n) for c in COLUMNS
            if c.made_by == "read" and decode in c.decode}


def _to_arrow(values: np.ndarray, type_: pa.DataType, null: np.ndarray) -> pa.Array:
    if pa.types.is_string(type_):
        return pa.array([None if z else str(v) for v, z in zip(values, null, strict=True)],
                        type_)
    if not pa.types.is_fixed_size_list(type_):
        return pa.array(np.nan_to_num(np.asarray(values, type_.to_pandas_dtype())), type_,
                        mask=null if null.any() else None)
    sizes, leaf = [], type_
    while pa.types.is_fixed_size_list(leaf):
        sizes.append(leaf.list_size)
        leaf = leaf.value_type
    flat = np.nan_to_num(np.asarray(values, leaf.to_pandas_dtype())).reshape(-1)
    array = pa.array(flat, leaf)
    for i, size in enumerate(reversed(sizes)):  # innermost first; only rows may be null
        array = pa.FixedSizeListArray.from_arrays(
            array, size, mask=pa.array(null) if i == len(sizes) - 1 and null.any() else None)
    return array


def rows_to_table(rows: Rows) -> pa.Table:
    """Predictor output rows of one piece (in input order) -> a table in ``SCHEMA``."""
    columns = {}
    for c in WRITTEN:
        values = c.file_value(rows) if c.file_value else np.asarray(rows[c.name])
        columns[c.name] = _to_arrow(values, c.arrow, c.null(rows, values))
    return pa.table(columns, schema=SCHEMA)


def _type_name(type_: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(type_):
        return f"fixed_size_list<{_type_name(type_.value_type)}>[{type_.list_size}]"
    return {"float": "float32"}.get(str(type_), str(type_))


def readme_table() -> str:
    """The README's table of the output columns, as markdown."""
    lines = ["| column | type | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{c.name}` | {_type_name(c.arrow)} | {c.meaning} |" for c in WRITTEN]
    return "\n".join(lines)
