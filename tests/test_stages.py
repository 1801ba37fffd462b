"""The Ray-free stages called directly: shard reading into units, prediction."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from support.helpers import sidecar, tar_members, write_tar

from pipeline.demo.synthetic import write_sample_archive
from pipeline.io.shards import list_shards
from pipeline.stages.predictor import LandmarkPredictor, PredictorSettings
from pipeline.stages.reader import ReaderSettings, ShardReader, decode_shard, encode_shard


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    write_sample_archive(str(root), num_shards=1, samples_per_shard=5, seed=11,
                         image_size=(96, 80))
    return tar_members(root / "faces-00000.tar")


def _rows(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_reader_rows_carry_keys_pixels_and_sizes(faces, tmp_path):
    write_tar(tmp_path / "a.tar", sorted(faces.items()))
    shard = list_shards(str(tmp_path))[0]
    assert decode_shard(encode_shard(shard)) == shard
    batches = list(ShardReader(ReaderSettings(unit_rows=2)).read(shard))
    assert [len(b["key"]) for b in batches] == [2, 2, 1]
    rows = _rows(batches)
    assert rows["key"].tolist() == [f"face-00000-{i:05d}" for i in range(5)]
    assert set(rows["shard"]) == {str(tmp_path / "a.tar")} and set(rows["error"]) == {""}
    assert rows["pixels"].shape == (5, 224, 224, 3) and rows["pixels"].std() > 10
    assert (rows["width"] == 96).all() and (rows["height"] == 80).all()


def test_truncated_tar_keeps_earlier_samples_and_ends_with_a_shard_error(faces, tmp_path):
    path = write_tar(tmp_path / "t.tar", sorted(faces.items()))
    data = path.read_bytes()
    # Cut 100 bytes into the 4th sample's image data (its 512-byte header starts with its name).
    cut = data.index(b"face-00000-00003.jpg") + 512 + 100
    path.write_bytes(data[:cut])
    rows = _rows(list(ShardReader().read(list_shards(str(tmp_path))[0])))
    assert rows["key"].tolist() == ["face-00000-00000", "face-00000-00001",
                                    "face-00000-00002", ""]
    assert rows["error"][:3].tolist() == ["", "", ""]
    assert rows["error"][3].startswith("shard error after 3 samples: ReadError")


def test_damaged_member_header_mid_archive_is_a_shard_error_and_later_members_are_read(
        faces, tmp_path):
    """A bad checksum on the 4th of 6 headers: tarfile alone stops there without an error (3
    samples would vanish and the shard count as complete). The reader goes on at the next valid
    header and ends the shard with its error row, so the shard is marked failed and redone."""
    jpegs = [v for k, v in sorted(faces.items()) if k.endswith(".jpg")]
    members = [(f"s{i}.jpg", jpegs[i % len(jpegs)]) for i in range(8)]
    path = write_tar(tmp_path / "t.tar", members[:6])
    data = bytearray(path.read_bytes())
    header = data.index(b"s3.jpg")
    data[header + 148:header + 156] = b"0000000\0"  # the checksum field: now wrong
    path.write_bytes(bytes(data))
    rows = _rows(list(ShardReader().read(list_shards(str(tmp_path))[0])))
    assert rows["key"].tolist() == ["s0", "s1", "s2", "s4", "s5", ""]
    assert rows["error"][:5].tolist() == [""] * 5 and rows["pixels"][:5].std() > 10
    assert rows["error_kind"][5] == "shard_error"
    assert rows["error"][5].startswith("shard error after 5 samples: DamagedShardError")
    assert f"a damaged member header at byte {header}" in rows["error"][5]
    # Zero blocks in the middle (two archives back to back): the second one is read too.
    first = write_tar(tmp_path / "u.tar", members[:2]).read_bytes()
    second = write_tar(tmp_path / "u.tar", members[6:]).read_bytes()
    (tmp_path / "u.tar").unlink()
    path.write_bytes(first + second)
    rows = _rows(list(ShardReader().read(list_shards(str(tmp_path))[0])))
    assert rows["key"].tolist() == ["s0", "s1", "s6", "s7", ""]
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # where the first archive's zeros start
    assert f"end-of-archive blocks at byte {end} with more data after them (went on at the " \
        f"next valid header, byte {len(first)})" in rows["error"][4]


def test_sample_level_errors(faces, tmp_path):
    good = faces["face-00000-00000.jpg"]
    write_tar(tmp_path / "e.tar", [
        ("a.jpg", good), ("a.json", b"{not json"),
        ("b.jpg", good), ("b.json", sidecar({"bbox": [50, 50, 10, 10]})),
        ("c.jpg", b""),
        ("d.jpg", good), ("d.json", sidecar({"bbox": [10, 10, 50, 60], "who": "x"})),
    ])
    rows = _rows(list(ShardReader().read(list_shards(str(tmp_path))[0])))
    errors = dict(zip(rows["key"], rows["error"], strict=True))
    assert errors["a"].startswith("sidecar a.json is not valid JSON")
    assert errors["b"] == "bbox [50, 50, 10, 10] is empty or inverted (need x0 < x1 and y0 < y1)"
    assert errors["c"] == "empty image (0 bytes)"
    assert errors["d"] == ""
    assert rows["bbox"][3].tolist() == [10, 10, 50, 60]
    # square around the box grown by 25 %: 40x50 -> 60x75 -> side 75 centred on (30, 35)
    assert rows["crop"][3].tolist() == [-7.5, -2.5, 75.0]


def test_predictor_skips_error_rows_and_maps_to_pixels(faces, tmp_path, weights_file):
    write_tar(tmp_path / "p.tar", [("x.jpg", b"junk"), *sorted(faces.items())[:4]])
    batch = _rows(list(ShardReader().read(list_shards(str(tmp_path))[0])))
    predictor = LandmarkPredictor(PredictorSettings(weights=weights_file[0], device="cpu"))
    out = predictor(batch)
    assert "pixels" not in out and out["landmarks"].shape == (3, 68, 2)
    assert np.isnan(out["landmarks"][0]).all()
    assert set(out["model_version"]) == {weights_file[2]}
    raw = predictor.forward(batch["pixels"][1:])
    crop = batch["crop"][1:]
    expected = crop[:, None, :2] + raw.reshape(-1, 68, 2) * crop[:, None, 2:3]
    np.testing.assert_allclose(out["landmarks"][1:], expected, rtol=1e-6)


def test_nonfinite_model_outputs_are_error_rows_not_zero_points(faces, tmp_path, weights_file):
    from pipeline.io.rows import rows_to_table

    write_tar(tmp_path / "p.tar", sorted(faces.items())[:6])
    batch = _rows(list(ShardReader().read(list_shards(str(tmp_path))[0])))
    predictor = LandmarkPredictor(PredictorSettings(weights=weights_file[0], device="cpu"))
    real = predictor.forward

    def forward(pixels):  # one image's activations blow up (NaN), another's overflow (inf)
        outputs = real(pixels)
        outputs[1, 7], outputs[2, 0] = np.nan, np.inf
        return outputs

    predictor.forward = forward
    out = predictor(batch)
    assert out["error_kind"].tolist() == ["", "nonfinite_output", "nonfinite_output"]
    assert out["error"][1].startswith("the model's output for this image is not finite")
    assert np.isfinite(out["landmarks"][0]).all() and np.isnan(out["landmarks"][1:]).all()
    table = rows_to_table({**out, "meta": np.array([""] * 3, dtype=object)}).to_pydict()
    assert table["landmarks"][1] is None and table["landmarks"][2] is None  # null, not (0, 0)
    assert table["error_kind"] == [None, "nonfinite_output", "nonfinite_output"]

    with torch.no_grad():  # broken weights: every row is an error
        predictor.runner.model.classifier[-2].bias.fill_(float("nan"))
    predictor.forward = real
    assert set(predictor(batch)["error_kind"]) == {"nonfinite_output"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_predictor_matches_cpu_within_bf16_tolerance(faces, tmp_path, weights_file):
    write_tar(tmp_path / "g.tar", sorted(faces.items()))
    batch = _rows(list(ShardReader().read(list_shards(str(tmp_path))[0])))
    cpu = LandmarkPredictor(PredictorSettings(weights=weights_file[0], device="cpu"))
    gpu = LandmarkPredictor(PredictorSettings(weights=weights_file[0], device="cuda"))
    cpu, gpu = cpu.forward(batch["pixels"]), gpu.forward(batch["pixels"])
    # bf16 autocast: outputs in [0, 1] of the crop agree to 2e-2 (about 4 px of the 224 input).
    np.testing.assert_allclose(gpu, cpu, atol=2e-2)


def test_parquet_side_columns_of_any_arrow_type_pass_through_as_json(faces, tmp_path):
    """Timestamps, dates, decimals, binary, durations, nested values: in ``meta`` as JSON. A
    value Python cannot hold (a timestamp in the year 10000) costs its sample, not the job."""
    import datetime as dt
    import decimal
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    jpegs = [v for k, v in sorted(faces.items()) if k.endswith(".jpg")][:3]
    table = pa.table({
        "key": ["a", "b", "c"],
        "image": jpegs,
        "taken": pa.array([dt.datetime(2026, 11, 20, 1, 2, 3, tzinfo=dt.timezone.utc)] * 2
                          + [None], pa.timestamp("us", tz="UTC")),
        "day": pa.array([dt.date(2026, 11, 20)] * 3, pa.date32()),
        "price": pa.array([decimal.Decimal("12.30")] * 3, pa.decimal128(6, 2)),
        "thumb": pa.array([b"\x00\x01", b"x" * 5000, None], pa.binary()),
        "took": pa.array([dt.timedelta(seconds=1.5)] * 3, pa.duration("ms")),
        "tags": pa.array([[{"k": "v", "n": 1.0}]] * 3),
        "far": pa.array([0, 0, 253402300800 + 86400], pa.timestamp("s")),  # 0: 1970; last: 10000
    })
    pq.write_table(table, tmp_path / "p.parquet")
    rows = _rows(list(ShardReader().read(list_shards(str(tmp_path / "p.parquet"))[0])))
    assert rows["key"].tolist() == ["a", "b", "c"]
    assert rows["error"][:2].tolist() == ["", ""] and rows["pixels"][:2].std() > 10
    meta = json.loads(rows["meta"][0])
    assert meta == {"taken": "2026-11-20T01:02:03+00:00", "day": "2026-11-20", "price": "12.30",
                    "thumb": "AAE=", "took": 1.5, "tags": [{"k": "v", "n": 1.0}],
                    "far": "1970-01-01T00:00:00"}
    assert json.loads(rows["meta"][1])["thumb"] == "<5000 bytes>"
    assert rows["error_kind"][2] == "bad_sidecar"
    assert rows["error"][2].startswith("a side column cannot be read as JSON: ")


def test_loose_files_that_cannot_be_read_transient_ones_leave_the_group_to_be_redone(
        faces, tmp_path, monkeypatch):
    """Loose images: a file gone or denied costs its row for good; a file whose read failed
    for transient errors after every retry gets its row too, but the group ends with a
    shard-level error, so its completion record says incomplete and the next run redoes it."""
    from pipeline.io import shards, storage
    from pipeline.stages.commit import PieceSpec, commit_piece, gather

    jpegs = [v for k, v in sorted(faces.items()) if k.endswith(".jpg")]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg"]):
        (folder / name).write_bytes(jpegs[i])
    real = shards.retry

    def flaky(fn, uri, what="", **kw):
        if uri.endswith("b.jpg"):
            raise PermissionError(f"access denied to {uri}")
        if uri.endswith("c.jpg"):
            raise storage.StorageError(f"read failed 6 times with transient errors: {uri}")
        return real(fn, uri, what, **kw)

    monkeypatch.setattr(shards, "retry", flaky)
    (shard,) = list_shards(str(folder))
    rows = _rows(list(ShardReader().read(shard)))
    assert rows["key"].tolist() == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", ""]
    assert rows["error_kind"].tolist() == ["", "storage", "storage", "", "storage"]
    assert "could not be read for transient storage errors" in rows["error"][4]
    spec = PieceSpec(output=str(tmp_path / "out"), shard=shard, piece=0, first_row=0, last=True,
                     model_version="m", settings="s", storage_options={})
    rows["landmarks"] = np.full((5, 68, 2), np.nan, dtype=np.float32)
    rows["model_version"] = np.full(5, "m", dtype=object)
    receipt = commit_piece(spec, gather([rows], [(0, 5)]))
    assert receipt["shard_failed"] and receipt["rows"] == 5

    def denied(fn, uri, what="", **kw):
        if uri.endswith("b.jpg"):
            raise PermissionError(f"access denied to {uri}")
        return real(fn, uri, what, **kw)

    monkeypatch.setattr(shards, "retry", denied)
    rows = _rows(list(ShardReader().read(shard)))  # only a permanent error: the group is done
    assert rows["key"].tolist() == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
