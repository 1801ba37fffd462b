"""Labelled samples: the reader's crops and targets, the hash split, the .pts importer."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.helpers import DATA, real_photo, sidecar, tar_members, write_tar

from pipeline.demo.synthetic import write_sample_archive
from pipeline.io.shards import list_shards, read_samples
from pipeline.stages.labels import (
    LabelledReader,
    bbox_from_landmarks,
    key_hash,
    parse_landmarks,
    split_of,
)
from pipeline.stages.preprocess import SampleError
from pipeline.stages.reader import ShardReader
from pipeline.training.importer import import_annotated_folder, parse_pts


def _labels(name: str) -> list[list[float]]:
    return json.loads((DATA / f"{name}.json").read_text())["landmarks"]


def test_split_is_a_stable_hash_of_the_key():
    # Fixed values: a change here would silently reshuffle every user's validation set.
    assert split_of("face-00000-00000", 0.5) == "train"  # hash position 0.889
    assert split_of("face-00000-00001", 0.5) == "val"  # 0.494
    assert split_of("face-00000-00000", 0.9) == "val"
    assert key_hash("photo-takeo") == 193998435110653092
    keys = [f"k{i}" for i in range(4000)]
    share = np.mean([split_of(k, 0.1) == "val" for k in keys])
    assert 0.085 < share < 0.115


def test_parse_landmarks_refuses_bad_labels():
    good = np.asarray(_labels("takeo"))
    assert parse_landmarks(good.tolist()).shape == (68, 2)
    for bad, message in (
        (None, "no landmarks"),
        (good[:5].tolist(), "shape"),
        ([["a", "b"]] * 68, "number pairs"),
    ):
        with pytest.raises(SampleError, match=message):
            parse_landmarks(bad)
    nan = good.copy()
    nan[3, 0] = np.nan
    with pytest.raises(SampleError, match="NaN"):
        parse_landmarks(nan.tolist())
    same = good.copy()
    same[45] = same[36]
    with pytest.raises(SampleError, match="36 and 45"):
        parse_landmarks(same.tolist())


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    write_sample_archive(
        str(root), num_shards=1, samples_per_shard=3, seed=2, image_size=(160, 120)
    )
    data, meta = real_photo("takeo.ppm")
    no_box = {"landmarks": meta["landmarks"]}
    write_tar(
        root / "faces-00001.tar",
        [
            ("takeo.ppm", data),
            ("takeo.json", sidecar(no_box)),
            ("nolabel.ppm", data),
            ("nolabel.json", sidecar({"bbox": meta["bbox"]})),
        ],
    )
    return root


def test_reader_crops_exactly_like_the_inference_job(archive):
    shard = list_shards(str(archive / "faces-00000.tar"))[0]
    rows = next(LabelledReader().read(shard))
    inference = next(ShardReader().read(shard))
    assert list(rows["key"]) == list(inference["key"])
    assert np.array_equal(rows["pixels"], inference["pixels"])
    assert np.allclose(rows["crop"], inference["crop"])
    for i, sample in enumerate(read_samples(shard)):
        points = np.asarray(sample.meta["landmarks"])
        x0, y0, side = rows["crop"][i]
        assert np.allclose(rows["landmarks"][i], (points - (x0, y0)) / side, atol=1e-6)
        assert rows["pixel_uv"][i] == pytest.approx(1 / side)
        assert rows["key_hash"][i] == key_hash(sample.key)


def test_reader_uses_the_landmark_extent_without_a_bbox_and_skips_unlabelled(archive):
    shard = list_shards(str(archive / "faces-00001.tar"))[0]
    reader = LabelledReader(context=1.5)
    batches = list(reader.read(shard))
    assert [k for b in batches for k in b["key"]] == ["takeo"]
    assert reader.skipped == 1
    rows = batches[0]
    assert rows["pixels"].shape == (1, 336, 336, 3)
    points = np.asarray(_labels("takeo"))
    x0, y0, x1, y1 = bbox_from_landmarks(points)
    side = max(x1 - x0, y1 - y0) * 1.5 * 1.5  # margin 0.25 per side, then the 1.5 context
    assert rows["crop"][0][2] == pytest.approx(side)
    assert rows["crop"][0][0] + side / 2 == pytest.approx((x0 + x1) / 2)


def test_reader_splits_train_and_val_by_key(archive):
    shard = list_shards(str(archive / "faces-00000.tar"))[0]
    keys = {
        s: [k for b in LabelledReader(split=s, val_fraction=0.5).read(shard) for k in b["key"]]
        for s in ("train", "val")
    }
    assert sorted(keys["train"] + keys["val"]) == [s.key for s in read_samples(shard)]
    assert all(split_of(k, 0.5) == "val" for k in keys["val"])


def test_reader_reads_labelled_parquet(tmp_path):
    data, meta = real_photo("breakingbad.jpg")
    table = pa.table(
        {"key": ["bb"], "image": [data], "landmarks": [meta["landmarks"]], "bbox": [meta["bbox"]]}
    )
    pq.write_table(table, tmp_path / "labelled.parquet")
    rows = next(LabelledReader().read(list_shards(str(tmp_path))[0]))
    x0, y0, side = rows["crop"][0]
    assert np.allclose(rows["landmarks"][0] * side + (x0, y0), meta["landmarks"], atol=1e-3)
    with pytest.raises(ValueError, match="loose images carry no labels"):
        next(LabelledReader().read(list_shards(str(DATA / "takeo.ppm"))[0]))


def _write_pts(path: Path, points, origin: int) -> None:
    # Decimal keeps the text exact: 31.31 + 1 is written as 32.31.
    rows = [f"{Decimal(str(x)) + origin} {Decimal(str(y)) + origin}" for x, y in points]
    path.write_text("version: 1\nn_points:  68\n{\n" + "\n".join(rows) + "\n}\n")


@pytest.mark.parametrize("origin", [1, 0])
def test_pts_importer_reads_the_shared_faces_annotations(tmp_path, origin):
    source = tmp_path / "dataset"
    (source / "indoor").mkdir(parents=True)
    for name, image in (("takeo", "takeo.ppm"), ("breakingbad", "breakingbad.jpg")):
        folder = source / "indoor" if name == "takeo" else source
        (folder / image).write_bytes((DATA / image).read_bytes())
        _write_pts(folder / f"{name}.pts", _labels(name), origin)
    (source / "unlabelled.jpg").write_bytes((DATA / "breakingbad.jpg").read_bytes())
    (source / "broken.jpg").write_bytes((DATA / "breakingbad.jpg").read_bytes())
    (source / "broken.pts").write_text("version: 1\nn_points: 3\n{\n1 2\n3 4\n5 6\n}\n")

    summary = import_annotated_folder(str(source), str(tmp_path / "out"), origin, per_shard=1)
    assert summary.samples == 2 and len(summary.shards) == 2
    assert sorted(Path(p).name for p, _ in summary.skipped) == ["broken.pts", "unlabelled.jpg"]
    members = {
        **tar_members(tmp_path / "out" / "part-00000.tar"),
        **tar_members(tmp_path / "out" / "part-00001.tar"),
    }
    assert members["indoor/takeo.ppm"] == (DATA / "takeo.ppm").read_bytes()
    for key, name in (("indoor/takeo", "takeo"), ("breakingbad", "breakingbad")):
        meta = json.loads(members[f"{key}.json"])
        assert meta["landmarks"] == _labels(name)  # exactly, 0-based
        assert meta["bbox"] == bbox_from_landmarks(np.asarray(_labels(name)))
    # The imported shards are labelled data for the reader as they are.
    shards = list_shards(str(tmp_path / "out"))
    assert [k for s in shards for b in LabelledReader().read(s) for k in b["key"]] == [
        "breakingbad",
        "indoor/takeo",
    ]


def test_json_annotations_import_too(tmp_path):
    summary = import_annotated_folder(str(DATA), str(tmp_path / "out"), origin=0, annotation="json")
    assert summary.samples == 2 and not summary.skipped
    members = tar_members(tmp_path / "out" / "part-00000.tar")
    assert json.loads(members["takeo.json"])["landmarks"] == _labels("takeo")


def test_parse_pts_refuses_malformed_files():
    with pytest.raises(ValueError, match="n_points is 68 but the file lists 2"):
        parse_pts("version: 1\nn_points: 68\n{\n1 2\n3 4\n}\n", 1)
    with pytest.raises(ValueError, match="no '\\{'"):
        parse_pts("1 2\n3 4\n", 1)
    with pytest.raises(ValueError, match="origin must be 0 or 1"):
        import_annotated_folder(str(DATA), "/tmp/unused", origin=2)


def test_import_pts_command(tmp_path, capsys):
    from pipeline.cli.main import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "takeo.ppm").write_bytes((DATA / "takeo.ppm").read_bytes())
    _write_pts(tmp_path / "in" / "takeo.pts", _labels("takeo"), 1)
    code = main(
        ["import-pts", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
         "--origin", "1"]
    )
    assert code == 0 and "1 labelled samples in 1 shard(s)" in capsys.readouterr().out
    meta = json.loads(tar_members(tmp_path / "out" / "part-00000.tar")["takeo.json"])
    assert meta["landmarks"] == _labels("takeo")
    assert (
        main(["import-pts", "--input", str(tmp_path / "nowhere"), "--output", "x", "--origin", "1"])
        == 2
    )
