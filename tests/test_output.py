"""Unit tests for pipeline.io.output: the output table and its atomic commit."""

import os
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.io.output import output_file_name, write_table_atomic
from pipeline.io.rows import (
    COLUMNS,
    NO_FACE,
    SCHEMA,
    SCHEMA_ID,
    TRAVEL_ONLY,
    empty_rows,
    readme_table,
    rows_to_table,
    schema_id,
)


def _rows(n: int) -> dict[str, np.ndarray]:
    """Predictor output rows: stage rows without pixels, plus landmarks and model_version."""
    rows = empty_rows(n)
    del rows["pixels"]
    rows["landmarks"] = np.full((n, 68, 2), np.nan, dtype=np.float32)
    rows["model_version"] = np.full(n, "0123456789abcdef", dtype=object)
    return rows


@pytest.fixture()
def rows():
    """Three rows: ok without bbox, a decode error, ok with a bbox and meta."""
    rows = _rows(3)
    rows["key"][:] = ["img/a", "img/b", "img/c"]
    rows["shard"][:] = "s3://bucket/in/shard-0.tar"
    rows["width"][:] = [640, 0, 200]
    rows["height"][:] = [480, 0, 100]
    rows["crop"][0] = [0.0, -80.0, 640.0]
    rows["crop"][2] = [-30.5, 0.25, 120.0]
    rows["bbox"][2] = [10.0, 20.0, 50.0, 100.0]
    rows["meta"][2] = '{"bbox": [10, 20, 50, 100]}'
    rows["error"][1] = "cannot decode image: UnidentifiedImageError: nope"
    rng = np.random.default_rng(0)
    rows["landmarks"][0] = rng.uniform(-50, 700, (68, 2)).astype(np.float32)
    rows["landmarks"][2] = rng.uniform(-50, 700, (68, 2)).astype(np.float32)
    return rows


def test_output_file_name():
    assert output_file_name("faces-00001") == "part-faces-00001.parquet"


def test_rows_to_table_schema_and_values(rows):
    table = rows_to_table(rows)
    assert table.schema.equals(SCHEMA)
    assert table.num_rows == 3
    out = table.to_pydict()
    assert out["key"] == ["img/a", "img/b", "img/c"]
    assert out["shard"] == ["s3://bucket/in/shard-0.tar"] * 3
    assert out["model_version"] == ["0123456789abcdef"] * 3
    assert out["width"] == [640, None, 200]
    assert out["height"] == [480, None, 100]
    assert out["bbox"] == [None, None, [10.0, 20.0, 50.0, 100.0]]
    # crop = [x0, y0, x0 + side, y0 + side]
    assert out["crop"] == [[0.0, -80.0, 640.0, 560.0], None, [-30.5, 0.25, 89.5, 120.25]]
    assert out["error"] == [None, "cannot decode image: UnidentifiedImageError: nope", None]
    assert out["meta"] == [None, None, '{"bbox": [10, 20, 50, 100]}']
    assert out["landmarks"][1] is None
    # Only the documented columns: no pipeline-internal column leaks into the file.
    assert table.column_names == [f.name for f in SCHEMA]


def test_rows_to_table_landmarks_round_trip_exactly(rows):
    table = rows_to_table(rows)
    column = table.column("landmarks").combine_chunks()
    assert column.type == pa.list_(pa.list_(pa.float32(), 2), 68)
    assert column.null_count == 1 and not column.is_valid()[1].as_py()
    for i in (0, 2):
        got = np.asarray(column[i].as_py(), dtype=np.float32)
        assert got.shape == (68, 2)
        np.testing.assert_array_equal(got, rows["landmarks"][i])
    # Flat values (float32, no conversion through float64 rounding).
    flat = column.flatten().flatten().to_numpy(zero_copy_only=False)
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat[: 68 * 2], rows["landmarks"][0].reshape(-1))


def test_rows_to_table_all_ok_and_all_errors():
    ok = _rows(2)
    ok["key"][:] = ["a", "b"]
    ok["shard"][:] = "x.tar"
    ok["width"][:], ok["height"][:] = 10, 20
    ok["crop"][:] = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    ok["landmarks"][:] = 1.5
    table = rows_to_table(ok)
    assert table.column("landmarks").null_count == 0
    assert table.column("crop").to_pylist() == [[1.0, 2.0, 4.0, 5.0], [4.0, 5.0, 10.0, 11.0]]
    assert table.column("error").null_count == 2

    bad = _rows(2)
    bad["key"][:] = ["", "k"]
    bad["shard"][:] = "x.tar"
    bad["error"][:] = ["shard error after 0 samples: ReadError: boom", "no image member"]
    table = rows_to_table(bad)
    assert table.schema.equals(SCHEMA)
    for name in ("landmarks", "crop", "width", "height", "bbox", "meta"):
        assert table.column(name).null_count == 2, name
    assert table.column("key").to_pylist() == ["", "k"]  # key is never null
    assert table.column("error").to_pylist() == list(bad["error"])


def test_rows_to_table_zero_rows():
    table = rows_to_table(_rows(0))
    assert table.num_rows == 0
    assert table.schema.equals(SCHEMA)


# --------------------------------------------------------------------------------------------
# write_table_atomic
# --------------------------------------------------------------------------------------------


def test_write_local_and_overwrite(tmp_path, rows):
    first = rows_to_table(rows)
    target = tmp_path / "out" / "nested" / output_file_name("shard-0")
    write_table_atomic(first, str(target))
    back = pq.read_table(target)
    assert back.schema.equals(SCHEMA)
    assert back.equals(first)

    second = rows_to_table({k: v[:1] for k, v in rows.items()})
    write_table_atomic(second, str(target))
    assert sorted(os.listdir(target.parent)) == ["part-shard-0.parquet"]  # no temporary files
    back = pq.read_table(target)
    assert back.num_rows == 1
    assert back.equals(second)


def test_write_memory(rows):
    root = f"/output-test-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    uri = f"memory://{root}/out/part-x.parquet"
    try:
        table = rows_to_table(rows)
        write_table_atomic(table, uri)
        with fsspec.open(uri, "rb") as f:
            assert pq.read_table(f).equals(table)
        smaller = table.slice(0, 2)
        write_table_atomic(smaller, uri)
        with fsspec.open(uri, "rb") as f:
            assert pq.read_table(f).equals(smaller)
        assert [p.rsplit("/", 1)[1] for p in fs.find(root)] == ["part-x.parquet"]
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_status_says_what_a_row_is_and_face_is_null_unless_detected():
    """Issue 24: `no_face` sat in error/error_kind (so `WHERE error IS NULL` dropped images that
    have no face, which are answers), and `face` was 0 both for "the first face" and "not
    searched". Now `status` is ok / no_face / error, `error` is for errors only, and `face` is
    null unless the detector found that face."""
    rows = _rows(4)
    rows["key"][:] = ["boxed", "face0", "face1", "empty"]
    rows["shard"][:] = "x.tar"
    rows["width"][:], rows["height"][:] = 64, 48
    rows["landmarks"][:3] = 1.0
    rows["face"][:] = [0, 0, 1, 0]
    rows["face_score"][1:3] = [0.99, 0.8]
    rows["error"][3] = "no face found (score above 0.9, at least 20 px)"
    rows["error_kind"][3] = NO_FACE
    table = rows_to_table(rows)
    assert table.column("status").to_pylist() == ["ok", "ok", "ok", "no_face"]
    assert table.column("face").to_pylist() == [None, 0, 1, None]
    assert table.column("error").to_pylist() == [None] * 4  # no error in any of them
    assert table.column("error_kind").to_pylist() == [None] * 4
    assert table.filter(pc.field("error").is_null()).num_rows == 4  # no_face kept
    assert table.column("landmarks").null_count == 1
    bad = _rows(1)
    bad["key"][:], bad["shard"][:] = ["k"], "x.tar"
    bad["error"][0], bad["error_kind"][0] = "cannot decode image", "decode"
    table = rows_to_table(bad)
    assert table["landmarks"][0].as_py() is None and table["face"][0].as_py() is None
    assert (table["status"][0].as_py(), table["error_kind"][0].as_py()) == ("error", "decode")


def test_the_readme_table_is_the_declared_schema():
    """The README's "Output schema" table is derived from pipeline.io.rows: a column added,
    renamed or retyped there and not in the README fails here."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert readme_table() in readme
    assert [f"`{f.name}`" for f in SCHEMA] == [
        line.split(" | ")[0][2:] for line in readme_table().splitlines()[2:]]


def test_the_stages_columns_come_from_the_declaration():
    cpu, gpu = empty_rows(2, "cpu"), empty_rows(2, "gpu")
    read = [c.name for c in COLUMNS if c.made_by == "read"]
    assert set(cpu) | set(gpu) == set(read)
    assert set(gpu) - set(cpu) == {"encoded", "orientation", "stored_size", "on_device",
                                   "find_faces"}
    assert set(cpu) - set(gpu) == {"pixels"}
    assert cpu["pixels"].shape == (2, 224, 224, 3) and cpu["crop"].shape == (2, 3)
    # What travels only between the stages is never written; everything else is.
    assert set(TRAVEL_ONLY) == set(cpu) ^ set(gpu)
    assert [f.name for f in SCHEMA] == [c.name for c in COLUMNS if c.name not in TRAVEL_ONLY]


def test_a_change_of_columns_changes_the_settings_id():
    """The columns are part of the settings id, so files of an older schema are rewritten."""
    from pipeline.inference.config import InferConfig

    assert InferConfig("in", "out").result_settings()["columns"] == SCHEMA_ID == schema_id(SCHEMA)
    assert schema_id(SCHEMA.append(pa.field("extra", pa.string()))) != SCHEMA_ID
    assert schema_id(SCHEMA.set(2, pa.field("width", pa.int64()))) != SCHEMA_ID
