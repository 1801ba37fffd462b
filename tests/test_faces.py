"""Archives without face boxes: the read stage detects faces and gives each its own row; the job
writes them with the face columns and counts images without a face apart from errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support.helpers import (
    DATA,
    LANDMARK_TOLERANCE_PX,
    mean_shape_model,
    normalize,
    real_photo,
    synthetic_mean_shape,
    write_tar,
)
from torchvision.ops import box_iou

from pipeline.inference.config import InferConfig
from pipeline.inference.job import run_inference
from pipeline.io.shards import list_shards
from pipeline.model.geometry import DEFAULT_FACE_THRESHOLD
from pipeline.stages.detect import ImageSettings
from pipeline.stages.preprocess import crop_and_resize, decode_image, to_pixels
from pipeline.stages.reader import ReaderSettings, ShardReader
from pipeline.stages.units import ReadTask, ShardTask


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


def _sheet() -> Image.Image:
    """Six copies of the portrait, 3x2."""
    portrait = decode_image((DATA / "takeo.ppm").read_bytes())
    w, h = portrait.size
    sheet = Image.new("RGB", (3 * w, 2 * h))
    for i in range(6):
        sheet.paste(portrait, ((i % 3) * w, (i // 3) * h))
    return sheet


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A tar shard of real photos without sidecars, one with its labelled box, and two images
    without any face."""
    bb, labelled = real_photo("breakingbad.jpg")
    rng = np.random.default_rng(3)
    noise = Image.fromarray(rng.integers(0, 256, (200, 260, 3), dtype=np.uint8))
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 300).astype(np.uint8), (200, 1)))
    members = [
        ("a-takeo.ppm", (DATA / "takeo.ppm").read_bytes()),
        ("b-breakingbad.jpg", bb),
        ("c-boxed.jpg", bb), ("c-boxed.json", json.dumps({"bbox": labelled["bbox"]}).encode()),
        ("d-noise.png", _png(noise)),
        ("e-gradient.jpg", _jpeg(gradient)),
        ("f-sheet.jpg", _jpeg(_sheet())),
    ]
    folder = tmp_path_factory.mktemp("photos")
    write_tar(folder / "photos.tar", members)
    return list_shards(str(folder))[0], labelled


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


KEYS = ["a-takeo", "b-breakingbad", "b-breakingbad", "c-boxed", "d-noise", "e-gradient",
        *["f-sheet"] * 4]


def test_read_stage_gives_a_row_per_face(photos):
    """--detect auto, --max-faces 4: the sidecar box wins; faces by descending score; a
    no_face row for each image without one; the unit's header maps 6 samples to 10 rows."""
    shard, labelled = photos
    reader = ShardReader(ReaderSettings(decode="cpu", detect="auto", unit_rows=100,
                                        images=ImageSettings(max_faces=4)))
    ((header, rows),) = list(reader.read_task(ReadTask(0, (ShardTask(shard),))))
    assert rows["key"].tolist() == KEYS
    assert rows["face"].tolist() == [0, 0, 1, 0, 0, 0, 0, 1, 2, 3]
    assert rows["error_kind"].tolist() == ["", "", "", "", "no_face", "no_face", "", "", "", ""]
    assert rows["error"][4].startswith(f"no face found (score above {DEFAULT_FACE_THRESHOLD:g}")
    detected = np.isfinite(rows["face_score"])
    assert detected.tolist() == [True, True, True, False, False, False, True, True, True, True]
    assert np.isnan(rows["face_box"][~detected]).all() and np.isnan(rows["bbox"][3]).sum() == 0
    scores = rows["face_score"]
    assert scores[1] >= scores[2] and (np.diff(scores[6:]) <= 0).all()
    assert scores[detected].min() > 0.9
    # The labelled face of breakingbad is one of the two found.
    ious = box_iou(torch.from_numpy(rows["face_box"][1:3]), torch.tensor([labelled["bbox"]]))
    assert ious.max() >= 0.5
    # Each face row's crop is around its own detector box (the model's box inside the crop).
    for i in np.flatnonzero(detected):
        x0, y0, side = rows["crop"][i]
        bx0, by0, bx1, by1 = rows["face_box"][i]
        assert x0 <= bx0 and bx1 <= x0 + side and side < 3 * max(bx1 - bx0, by1 - by0)
    assert (rows["width"][:4] > 0).all() and rows["width"][4] == 260  # no_face rows keep sizes
    assert (header.rows, header.out_rows) == (6, 10)
    assert [(s.start, s.stop, s.out_start, s.out_stop) for s in header.segments] == [
        (0, 6, 0, 10)]
    assert rows["pixels"][detected].reshape(7, -1).max(axis=1).min() > 0


def test_predictor_finds_the_faces_of_device_decoded_rows(photos, weights_file, monkeypatch):
    """--decode gpu: the read task sends the unboxed samples' bytes with find_faces set; the
    predictor decodes each once (here on the CPU device: JPEGs through torchvision's decoder,
    the PPM and PNG through the CPU path), detects, and gives the CPU path's rows, crops and
    faces; the unit's header is rewritten from source_row."""
    from pipeline.stages import predictor as predictor_module
    from pipeline.stages.predictor import LandmarkPredictor, PredictorSettings
    from pipeline.stages.units import expand_header

    shard, _ = photos
    task = ReadTask(0, (ShardTask(shard),))
    ((header, rows),) = list(ShardReader(ReaderSettings(decode="gpu", detect="auto", unit_rows=100))
                             .read_task(task))
    assert rows["find_faces"].tolist() == [True, True, False, True, True, True]
    assert np.isnan(rows["crop"][rows["find_faces"]]).all() and header.out_rows == 6
    predictor = LandmarkPredictor(PredictorSettings(
        weights=weights_file[0], device="cpu", images=ImageSettings(max_faces=4)))
    # 5 images to search: decoded and searched 2 at a time
    monkeypatch.setattr(predictor_module, "DETECT_CHUNK", 2)
    out = predictor(rows)
    assert out["key"].tolist() == KEYS and out["face"].tolist() == [0, 0, 1, 0, 0, 0, 0, 1, 2, 3]
    assert out["source_row"].tolist() == [0, 1, 1, 2, 3, 4, 5, 5, 5, 5]
    assert out["error_kind"].tolist() == ["", "", "", "", "no_face", "no_face", "", "", "", ""]
    # Each image decoded once, counted on its first row: the PPM and the PNG by the CPU path.
    assert out["device_decode"].tolist() == ["format", "ok", "", "ok", "format", "ok", "ok",
            "",
                                             "", ""]
    six = ImageSettings(max_faces=6)
    ((_, cpu),) = list(ShardReader(ReaderSettings(decode="cpu", detect="auto", unit_rows=100,
                                                  images=six)).read_task(task))
    # The same faces as the CPU path, which detects each image alone: here one batch, padded
    # to its largest image, moves boxes by a fraction of a pixel, and among the sheet's six
    # equal faces --max-faces 4 may keep other ones (the reference keeps all six).
    for i in np.flatnonzero(np.isfinite(out["face_score"])):
        same = np.flatnonzero(cpu["key"] == out["key"][i])
        ious = box_iou(torch.from_numpy(out["face_box"][i:i + 1]),
                       torch.from_numpy(cpu["face_box"][same]))[0]
        j = same[int(ious.argmax())]
        assert ious.max() > 0.97 and abs(out["face_score"][i] - cpu["face_score"][j]) < 1e-3
        assert np.abs(out["crop"][i] - cpu["crop"][j]).max() < 0.02 * cpu["crop"][j][2]
    found = np.isfinite(out["landmarks"]).all(axis=(1, 2))
    assert found.tolist() == [True, True, True, True, False, False, True, True, True, True]
    expanded = expand_header(header, out["source_row"])
    assert (expanded.rows, expanded.out_rows) == (6, 10)
    assert [(s.start, s.stop, s.out_start, s.out_stop) for s in expanded.segments] == [
        (0, 6, 0, 10)]


def test_detect_never_and_always(photos):
    shard, _ = photos
    task = ReadTask(0, (ShardTask(shard),))
    ((_, never),) = list(ShardReader(ReaderSettings(detect="never")).read_task(task))
    assert never["key"].tolist() == ["a-takeo", "b-breakingbad", "c-boxed",
            "d-noise",
                                     "e-gradient", "f-sheet"]
    assert not any(never["error"]) and np.isnan(never["face_score"]).all()
    always = ReaderSettings(detect="always", images=ImageSettings(max_faces=6))
    ((_, always),) = list(ShardReader(always).read_task(task))
    assert always["key"].tolist().count("c-boxed") == 2  # its sidecar box is not used
    assert always["key"].tolist().count("f-sheet") == 6


def test_units_cut_by_output_rows_and_pieces_by_samples(photos):
    """Two rows per unit and two samples per output file: pieces complete by samples, their
    rows
            come from the expanded ranges."""
    from pipeline.stages.units import PieceAssembler

    shard, _ = photos
    reader = ShardReader(ReaderSettings(detect="auto", unit_rows=2, rows_per_file=2,
                                        images=ImageSettings(max_faces=4)))
    units = list(reader.read_task(ReadTask(0, (ShardTask(shard),))))
    assert all(h.out_rows == len(r["key"]) for h, r in units)
    assembler, pieces = PieceAssembler(), {}
    for n, (header, _) in enumerate(units):
        for ready in assembler.add(header, n):
            pieces[ready.piece] = [k for u, (a, b) in ready.parts
                                   for k in units[u][1]["key"][a:b].tolist()]
    assert pieces == {0: ["a-takeo", "b-breakingbad", "b-breakingbad"],
                      1: ["c-boxed", "d-noise"], 2: ["e-gradient", *["f-sheet"] * 4]}


def test_job_writes_a_row_per_face(ray_session, photos, weights_file, tmp_path):
    shard, labelled = photos
    summary = run_inference(InferConfig(input=shard.uri, output=str(tmp_path / "out"),
                                        weights=weights_file[0], batch_size=4, max_faces=4))
    assert (summary.samples, summary.faces, summary.no_face, summary.errors) == (6, 7, 2, 0)
    assert not summary.failed and "7 faces found, 2 images without a face" in summary.line()
    table = pq.read_table(summary.files[0])
    assert table.column("key").to_pylist() == KEYS
    ids = list(zip(table.column("key").to_pylist(), table.column("face").to_pylist(),
                   strict=True))
    assert len(set(ids)) == len(ids)  # (shard, key, face) is unique
    rows = table.to_pylist()
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert (manifest["faces"], manifest["no_face"], manifest["samples"]) == (7, 2, 6)
    # The scores of the faces found, in bins of 0.05 (issue 21: how near the threshold they are)
    scores = manifest["face_scores"]
    edges = scores["edges"]
    assert (len(edges), edges[0], edges[-1], scores["threshold"]) == (21, 0.0, 1.0,
                                                                       DEFAULT_FACE_THRESHOLD)
    found = [s for s in (r["face_score"] for r in rows) if s is not None and s == s]
    assert len(found) == 7
    assert scores["counts"] == [sum(lo <= s < hi or (hi == 1.0 and s == 1.0) for s in found)
                                for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    _assert_model_on_crops(rows, weights_file[1], tolerance=0.05)
    assert rows[4]["landmarks"] is None and rows[4]["status"] == "no_face"
    assert (rows[4]["face"], rows[4]["error"], rows[4]["error_kind"]) == (None, None, None)
    assert {r["status"] for r in rows} == {"ok", "no_face"}

    # --decode gpu (here the CPU actor decodes the bytes): the predictor finds the faces; the
    # same rows, and each face's landmarks are the model's on its crop within the decode
    # paths' tolerance (the device crop equals the CPU crop within the tests' TOLERANCE).
    gpu = run_inference(InferConfig(input=shard.uri, output=str(tmp_path / "gpu"),
                                    weights=weights_file[0], batch_size=4, max_faces=4,
                                    decode="gpu"))
    assert (gpu.samples, gpu.faces, gpu.no_face, gpu.errors) == (6, 7, 2, 0)
    other = pq.read_table(gpu.files[0])
    for column in ("key", "face", "status", "error_kind"):
        assert other.column(column).equals(table.column(column)), column
    _assert_model_on_crops(other.to_pylist(), weights_file[1], tolerance=LANDMARK_TOLERANCE_PX)


def _assert_model_on_crops(rows: list[dict], model, tolerance: float) -> None:
    """The landmarks of the takeo and breakingbad face rows are the model's on the row's
    crop of the decoded photo (reference computation: PIL crop, plain forward pass)."""
    images = {"a-takeo": (DATA / "takeo.ppm").read_bytes(),
              "b-breakingbad": (DATA / "breakingbad.jpg").read_bytes()}
    checked = 0
    for row in rows:
        if row["key"] not in images:
            continue
        x0, y0, x1, _ = row["crop"]
        crop = (x0, y0, x1 - x0)
        pixels = crop_and_resize(decode_image(images[row["key"]]), crop)[None]
        with torch.no_grad():
            out = model.eval()(torch.from_numpy(normalize(pixels))).numpy()
        np.testing.assert_allclose(np.asarray(row["landmarks"]), to_pixels(out, [crop])[0],
                                   atol=tolerance)
        assert len(row["face_points"]) == 5 and row["face_score"] > 0.9
        checked += 1
    assert checked == 3


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Labelled photos without boxes (sidecar: the 68 points only), and noise labelled with a
    face that is not there."""
    members = []
    for key, name in (("a-takeo", "takeo.ppm"), ("b-breakingbad", "breakingbad.jpg")):
        data, side = real_photo(name)
        members += [(f"{key}.{name.rsplit('.', 1)[1]}", data),
                    (f"{key}.json", json.dumps({"landmarks": side["landmarks"]}).encode())]
    _, takeo = real_photo("takeo.ppm")
    noise = np.random.default_rng(4).integers(0, 256, (225, 150, 3), dtype=np.uint8)
    members += [("c-noise.png", _png(Image.fromarray(noise))),
                ("c-noise.json", json.dumps({"landmarks": takeo["landmarks"]}).encode())]
    folder = tmp_path_factory.mktemp("labelled")
    write_tar(folder / "labelled.tar", members)
    return folder


def test_evaluation_scores_detection_and_landmarks_end_to_end(ray_session, labelled,
                                                              weights_file, tmp_path):
    """``evaluate --weights --detect always`` and ``evaluate --predictions`` of an inference run
    with detection score the same faces with the same NME; the labelled face in the noise is
    missed and counted as a failure; in breakingbad the labelled person's face is scored, not
    the other one."""
    from pipeline.evaluation.config import EvalConfig
    from pipeline.evaluation.evaluate import main as evaluate

    direct = evaluate(EvalConfig(labels=str(labelled), weights=weights_file[0], detect="always",
                                 report=str(tmp_path / "direct.json"), device="cpu"))
    summary = run_inference(InferConfig(input=str(labelled), output=str(tmp_path / "out"),
                                        weights=weights_file[0], batch_size=4))
    assert (summary.samples, summary.faces, summary.no_face) == (3, 3, 1)
    via_job = evaluate(EvalConfig(labels=str(labelled), predictions=str(tmp_path / "out"),
                                  report=str(tmp_path / "job.json")))
    for report in (direct, via_job):
        assert report["samples"] == 2 and report["missed_faces"] == 1
        assert report["missed"] == ["c-noise"] and report["failure_rate@0.08"] == 1.0
    assert via_job["nme"] == pytest.approx(direct["nme"], rel=1e-3)
    assert dict(via_job["worst"]) == pytest.approx(dict(direct["worst"]), rel=1e-3)
    # Without detection the box-given mode scores both labelled faces and misses nothing.
    boxed = evaluate(EvalConfig(labels=str(labelled), weights=weights_file[0],
                                report=str(tmp_path / "boxed.json"), device="cpu"))
    assert boxed["samples"] == 3 and boxed["missed_faces"] == 0


def test_detected_faces_get_the_landmarks_their_labelled_box_would(labelled, tmp_path):
    """No trained model exists offline, so: a model that answers every crop with the mean
    shape of synthetic faces (helpers.mean_shape_model). Its landmarks fall on a face exactly
    as well as the crop frames the face. Through detection (``evaluate --detect always``: the
    detector, the box map, the crop, the model, back to image pixels), both labelled faces get
    an NME no worse than from their labelled box, and several times better than the centred
    square the job cut before it had a detector."""
    from pipeline.evaluation.config import EvalConfig
    from pipeline.evaluation.evaluate import main as evaluate
    from pipeline.model.metrics import nme
    from pipeline.stages.preprocess import crop_square, to_pixels

    weights = mean_shape_model(tmp_path / "mean-shape.pt")
    reports = {
        detect: evaluate(EvalConfig(labels=str(labelled), weights=weights, detect=detect,
                                    report=str(tmp_path / f"{detect}.json"), device="cpu"))
        for detect in ("always", "never")
    }
    detected, boxed = (dict(reports[d]["worst"]) for d in ("always", "never"))
    assert reports["always"]["missed"] == ["c-noise"]
    assert sorted(detected) == ["a-takeo", "b-breakingbad"]
    mean = synthetic_mean_shape().reshape(1, -1)
    for key, name in (("a-takeo", "takeo.ppm"), ("b-breakingbad", "breakingbad.jpg")):
        data, side = real_photo(name)
        width, height = decode_image(data).size
        target = np.asarray(side["landmarks"])[None]
        centred = float(nme(to_pixels(mean, [crop_square(width, height, None)]), target)[0])
        assert detected[key] <= 1.1 * boxed[key], (key, detected[key], boxed[key])
        assert centred > 2.5 * detected[key], (key, centred, detected[key])
    assert detected["a-takeo"] < 0.2  # the frontal portrait (interocular-normalised)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_predictor_finds_the_faces_once_decoded(photos, weights_file):
    """The device path on a GPU: nvJPEG decodes the JPEGs once, the detector runs on them in
    one batch on the GPU and the crops are cut there: the same rows and faces as on the CPU."""
    from pipeline.stages.predictor import LandmarkPredictor, PredictorSettings

    shard, _ = photos
    ((_, rows),) = list(ShardReader(ReaderSettings(decode="gpu", detect="auto", unit_rows=100))
                        .read_task(ReadTask(0, (ShardTask(shard),))))
    on_cpu = LandmarkPredictor(PredictorSettings(
        weights=weights_file[0], device="cpu", images=ImageSettings(max_faces=4)))(rows)
    cuda = LandmarkPredictor(PredictorSettings(
        weights=weights_file[0], device="cuda", images=ImageSettings(max_faces=4)))
    on_gpu = cuda(rows)
    assert on_gpu["key"].tolist() == KEYS and on_gpu["source_row"].tolist() == on_cpu[
        "source_row"].tolist()
    assert on_gpu["error_kind"].tolist() == on_cpu["error_kind"].tolist()
    # The PPM and the PNG took the CPU path; the JPEGs were decoded on the GPU.
    assert on_gpu["device_decode"].tolist() == on_cpu["device_decode"].tolist()
    assert on_gpu["device_decode"].tolist().count("format") == 2
    found = np.isfinite(on_gpu["face_score"])
    ious = box_iou(torch.from_numpy(on_gpu["face_box"][found][:3]),
                   torch.from_numpy(on_cpu["face_box"][found][:3])).diagonal()
    assert (ious > 0.97).all()
