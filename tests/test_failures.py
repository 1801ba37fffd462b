"""Nothing lost, nothing twice: bad input, dying processes, and resumed runs.

Every input sample must end up in exactly one output row, with landmarks or with an error that
says what was wrong."""

from __future__ import annotations

import io
import json
import struct
import sys
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.helpers import cluster_job, sidecar, tar_members, write_tar

from pipeline.cli.main import main
from pipeline.demo.synthetic import write_sample_archive
from pipeline.inference.config import InferConfig
from pipeline.inference.job import run_inference
from pipeline.io.report import read_receipts
from pipeline.io.shards import list_shards
from pipeline.stages.reader import ShardReader


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def _png_with_size(width: int, height: int) -> bytes:
    """A real PNG whose header claims another size (a decompression bomb's signature)."""
    data = bytearray(_encode(Image.new("L", (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def bad_input_members(face_jpeg: bytes) -> tuple[list, dict]:
    """(tar members, {key: (expected error_kind or None, expected (w, h) or None)})."""
    cmyk = _encode(Image.new("CMYK", (50, 40), (0, 100, 200, 0)), "JPEG")
    grey16 = Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))
    palette = Image.new("P", (36, 24), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    exif = Image.Image().getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    rotated = _encode(Image.new("RGB", (60, 40), (200, 30, 30)), "JPEG", exif=exif.tobytes())
    broken_crc = bytearray(_encode(Image.new("RGB", (20, 20)), "PNG"))
    broken_crc[32] ^= 0xFF  # last byte of the IHDR chunk's CRC
    members = [
        ("zero-byte.jpg", b""),
        ("random-bytes.jpg", bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8))),
        ("truncated.jpg", face_jpeg[: len(face_jpeg) // 2]),
        ("broken-crc.png", bytes(broken_crc)),
        ("cmyk.jpg", cmyk),
        ("grey16.png", _encode(grey16, "PNG")),
        ("palette-transparent.png", _encode(palette, "PNG", transparency=0)),
        ("grey.jpg", _encode(Image.new("L", (32, 48), 128), "JPEG")),
        ("one-pixel.png", _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")),
        ("exif-rotated.jpg", rotated),
        ("over-limit.png", _png_with_size(3000, 3000)),
        ("bomb.png", _png_with_size(30000, 30000)),
        ("bad-sidecar.jpg", face_jpeg), ("bad-sidecar.json", b"{not json"),
        ("bbox-outside.jpg", face_jpeg),
        ("bbox-outside.json", sidecar({"bbox": [900, 900, 990, 990]})),
        ("bbox-empty.jpg", face_jpeg),
        ("bbox-empty.json", sidecar({"bbox": [10, 10, 10, 50]})),
        ("bbox-inverted.jpg", face_jpeg),
        ("bbox-inverted.json", sidecar({"bbox": [50, 50, 10, 10]})),
        ("dup.jpg", face_jpeg),
        ("ünï cödé face.jpg", face_jpeg),
        ("dup.jpg", face_jpeg),
        ("caption-only.txt", b"text"),
    ]
    expected = {
        "zero-byte": ("empty", None), "random-bytes": ("decode", None),
        "truncated": ("decode", None), "broken-crc": ("decode", None),
        "cmyk": (None, (50, 40)), "grey16": (None, (40, 30)),
        "palette-transparent": (None, (36, 24)), "grey": (None, (32, 48)),
        "one-pixel": (None, (1, 1)), "exif-rotated": (None, (40, 60)),
        "over-limit": ("too_large", None), "bomb": ("too_large", None),
        "bad-sidecar": ("bad_sidecar", None), "bbox-outside": ("bad_bbox", None),
        "bbox-empty": ("bad_bbox", None), "bbox-inverted": ("bad_bbox", None),
        "ünï cödé face": (None, (128, 96)), "caption-only": ("no_image", None),
    }
    return members, expected


@pytest.fixture(scope="module")
def bad_run(ray_session, weights_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_sample_archive(str(root / "in"), 1, 3, seed=9, image_size=(128, 96))
    faces = tar_members(root / "in" / "faces-00000.tar")
    face = faces["face-00000-00000.jpg"]
    members, expected = bad_input_members(face)
    write_tar(root / "in" / "bad.tar", members)
    # A shard damaged part-way (cut inside its 3rd member), and one cut between members.
    whole = write_tar(root / "whole.tar", sorted(faces.items())).read_bytes()
    cut = whole.index(b"face-00000-00001.jpg") + 600
    (root / "in" / "cut-mid.tar").write_bytes(whole[:cut])
    (root / "in" / "cut-between.tar").write_bytes(whole[: whole.index(b"face-00000-00001.jpg")])
    # detect="never": images without a box are cropped to their centred square (what this test
    # checks), not searched for faces (tests/test_faces.py)
    cfg = InferConfig(input=str(root / "in"), output=str(root / "out"),
                      weights=weights_file[0], batch_size=4, max_pixels=5_000_000,
                      detect="never")
    summary = run_inference(cfg)
    tables = {p.stem[5:]: pq.read_table(p).to_pylist() for p in (root / "out").glob("*.parquet")}
    return summary, tables, expected, root


def test_each_bad_input_gets_its_row_and_the_job_goes_on(bad_run):
    _, tables, expected, _ = bad_run
    rows = tables["bad"]
    keys = [r["key"] for r in rows]
    assert keys == ["zero-byte", "random-bytes", "truncated", "broken-crc", "cmyk", "grey16",
                    "palette-transparent", "grey", "one-pixel", "exif-rotated", "over-limit",
                    "bomb", "bad-sidecar", "bbox-outside", "bbox-empty", "bbox-inverted",
                    "dup", "ünï cödé face", "dup", "caption-only"]
    by_key = {r["key"]: r for r in rows if r["key"] != "dup"}
    for key, (kind, size) in expected.items():
        row = by_key[key]
        assert row["error_kind"] == kind, (key, row["error"])
        if kind is None:
            assert row["error"] is None and (row["width"], row["height"]) == size, key
            assert np.isfinite(np.asarray(row["landmarks"])).all(), key
        else:
            assert row["error"] and row["landmarks"] is None, key
    assert "above the limit of 5000000" in by_key["over-limit"]["error"]
    assert "decompression bomb" in by_key["bomb"]["error"]
    assert "not valid JSON" in by_key["bad-sidecar"]["error"]
    assert "lies outside the 128x96 image" in by_key["bbox-outside"]["error"]
    first, second = [r for r in rows if r["key"] == "dup"]
    assert first["error"] is None and second["error_kind"] == "duplicate_key"
    assert second["error"] == "duplicate key 'dup': first seen at row 16 of this shard"


def test_damaged_shards_keep_what_came_before_and_are_marked(bad_run):
    _, tables, _, _ = bad_run
    mid = tables["cut-mid"]
    assert [r["key"] for r in mid] == ["face-00000-00000", ""]
    assert mid[0]["error"] is None
    assert mid[1]["error_kind"] == "shard_error"
    assert mid[1]["error"].startswith("shard error after 1 samples: ReadError")
    between = tables["cut-between"]
    assert [r["key"] for r in between] == ["face-00000-00000", ""]
    assert "without the tar end-of-archive marker" in between[1]["error"]


def test_summary_counts_errors_by_kind_and_fails_the_run(bad_run):
    summary, tables, _, root = bad_run
    assert summary.samples == sum(len(t) for t in tables.values()) == 3 + 20 + 2 + 2
    assert summary.errors_by_kind == {
        "empty": 1, "decode": 3, "too_large": 2, "bad_sidecar": 1, "bad_bbox": 3,
        "duplicate_key": 1, "no_image": 1, "shard_error": 2}
    assert summary.errors == 14
    assert sorted(summary.failed_shards) == ["cut-between", "cut-mid"] and summary.failed
    manifest = json.loads((root / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["errors_by_kind"]["decode"] == 3
    receipts = {r["file"]: r for r in read_receipts(str(root / "out"))}
    assert sorted(receipts) == sorted(f"part-{name}.parquet" for name in tables)
    bad = receipts["part-bad.parquet"]
    assert (bad["rows"], bad["errors"], bad["shard_failed"]) == (20, 12, False)
    assert receipts["part-cut-mid.parquet"]["errors_by_kind"] == {"shard_error": 1}


def test_shard_that_disappears_after_listing_and_parquet_with_wrong_schema(tmp_path):
    write_sample_archive(str(tmp_path / "a"), 1, 1, image_size=(32, 32))
    shard = list_shards(str(tmp_path / "a"))[0]
    (tmp_path / "a" / "faces-00000.tar").unlink()
    rows = list(ShardReader().read(shard))[0]
    assert rows["key"].tolist() == [""] and rows["error_kind"].tolist() == ["missing_file"]
    assert "not found:" in rows["error"][0] and "faces-00000.tar" in rows["error"][0]

    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"id": ["x"], "pixels": [b"..."]}), tmp_path / "p" / "w.parquet")
    rows = list(ShardReader().read(list_shards(str(tmp_path / "p"))[0]))[0]
    assert rows["error_kind"].tolist() == ["shard_error"]
    assert "has no column ['image', 'key']" in rows["error"][0]


def test_exit_status_follows_the_error_fraction(ray_session, weights_file, tmp_path):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "s.tar", [
        ("good.jpg", _encode(Image.new("RGB", (40, 40), (120, 90, 60)), "JPEG")),
        ("bad.jpg", b"garbage"),
    ])
    args = ["infer", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--weights", weights_file[0]]
    assert main([*args, "--max-error-fraction", "0.6"]) == 0
    # Resumed: nothing to redo, but the output still holds 1 error in 2 rows.
    assert main([*args, "--max-error-fraction", "0.4"]) == 1


class BrokenPredictor:
    """A predictor whose actors cannot start (as with a GPU driver missing on a node)."""

    def __init__(self, settings=None, weights_data=None):  # as LandmarkPredictor
        raise RuntimeError("CUDA driver not found on this node")


def test_a_stage_that_fails_for_good_stops_the_run_with_its_cause(ray_session, tmp_path):
    import ray.cloudpickle

    from pipeline.backend.executor import StageFailed

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ship the class itself
    write_sample_archive(str(tmp_path / "in"), 2, 1, image_size=(32, 32))
    cfg = InferConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), batch_size=2)
    with pytest.raises(StageFailed, match=r"a predictor actor failed for good .*CUDA driver "
                                          r"not found on this node.*a rerun does the rest"):
        run_inference(cfg, predictor=BrokenPredictor)
    assert not list((tmp_path / "out").glob("*.parquet"))


class HangingPredictor:
    """A predictor whose calls never return (a wedged GPU, a deadlocked library)."""

    def __init__(self, settings=None, weights_data=None):  # as LandmarkPredictor
        pass

    def __call__(self, unit):
        time.sleep(3600)


def test_a_stalled_stage_stops_the_run_and_says_which(ray_session, tmp_path, monkeypatch,
                                                       capsys):
    """No unit predicted or committed for --stall-timeout: the run stops (instead of waiting
    for ever), naming the stalled stage and what every stage holds."""
    import ray.cloudpickle

    from pipeline.backend.executor import StageStalled

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    write_sample_archive(str(tmp_path / "in"), 2, 1, image_size=(32, 32))
    cfg = InferConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), batch_size=2,
                      device="cpu", stall_timeout=10)
    started = time.monotonic()
    with pytest.raises(StageStalled) as stalled:
        run_inference(cfg, predictor=HangingPredictor)
    assert time.monotonic() - started < 60
    message = str(stalled.value)
    assert message.startswith("no unit moved for 10 s (--stall-timeout): stalled in the "
                              "predict stage: 1 unit(s) sent to the predictor actors got no "
                              "answer"), message
    assert "units in flight per actor [1]" in message and "commits running: 0" in message
    assert message.endswith("a rerun resumes")
    assert not list((tmp_path / "out").glob("*.parquet"))

    # On the command line: one line and exit status 1.
    def stalls(cfg, config=None):
        raise StageStalled("no unit moved for 10 s (--stall-timeout): stalled in the read stage")

    monkeypatch.setattr("pipeline.inference.job.run_inference", stalls)
    from pipeline.cli.main import main

    assert main(["infer", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o2"),
                 "--stall-timeout", "10"]) == 1
    err = capsys.readouterr().err
    assert "error: no unit moved for 10 s (--stall-timeout): stalled in the read stage" in err
    assert "Traceback" not in err


def test_a_task_killed_for_memory_is_retried_a_few_times_not_for_ever():
    """Two tasks that each need 3 GB on a node whose memory monitor kills above what is in use
    now + 1.5 GB. Ray's default reruns such tasks for ever (the job would never end); the cap
    ``ensure_ray`` sets makes them fail with Ray's OutOfMemoryError after a few attempts."""
    from pipeline.backend.cluster import OOM_TASK_RETRIES

    result = cluster_job("oom-cap")
    assert result["driver_setting"] == str(OOM_TASK_RETRIES)
    assert result["outcomes"] == ["OutOfMemoryError", "OutOfMemoryError"], result
    assert 2 <= result["attempts"] <= 2 * (OOM_TASK_RETRIES + 1), result
