"""The evaluation job: labelled shards + (a model file or the inference job's Parquet) -> report.

With a model file, each labelled sample is cropped exactly as the inference job crops it (the
sidecar ``bbox``, else the landmarks' extent, grown by ``margin``) and run through the inference
predictor, in this process. With ``detect="always"`` the face detector finds the faces in each
labelled image first, as the inference job does, and the face whose box (mapped to the landmark
model's convention) overlaps the labelled face's box by ``MATCH_IOU`` or more is scored: detection
and landmarks end to end. For archives too large for one process, run the inference job on the
cluster and evaluate its Parquet output with ``predictions``: rows are matched to labels by key,
and where an image has rows for several detected faces, by the same overlap.

A labelled face that detection missed (no face found, or none overlapping it) counts as a
failure: in the failure rate and the AUC (as an infinite NME), not in the mean NME, and the
report says how many (``missed_faces``).
Writes a JSON report (inter-ocular NME, failure rate and AUC at the threshold, NME per region, the
worst samples), a PNG of the cumulative error distribution, and a page with both beside them
(``report.json`` -> ``report.html``, ``pipeline.report.evaluation``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline.config.errors import BadInput
from pipeline.evaluation.config import EvalConfig
from pipeline.io.rows import NO_FACE
from pipeline.io.shards import Sample, Shard, list_shards, read_samples
from pipeline.model.metrics import auc, ced_curve, failure_rate, nme, plot_ced, summarize
from pipeline.report.evaluation import render_evaluation, report_page_uri
from pipeline.stages.labels import LabelledReader, parse_landmarks, split_of
from pipeline.stages.preprocess import SampleError

log = logging.getLogger("pipeline")

MATCH_IOU = 0.5  # a found face is the labelled one when its box overlaps the labelled box this much


def best_match(label_box: np.ndarray, boxes: np.ndarray) -> int | None:
    """The index of the box (in the landmark model's convention) that overlaps ``label_box``
    most, if it overlaps it by ``MATCH_IOU`` or more."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        return None
    lo = np.maximum(boxes[:, :2], label_box[:2])
    hi = np.minimum(boxes[:, 2:], label_box[2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    iou = inter / (area + np.prod(label_box[2:] - label_box[:2]) - inter)
    best = int(iou.argmax())
    return best if iou[best] >= MATCH_IOU else None


def read_labels(
    shard: Shard, cfg: EvalConfig
) -> Iterator[tuple[Sample, np.ndarray | None, str | None]]:
    """``(sample, landmarks in pixels or None, error or None)`` of the samples of ``cfg.split``
    in one shard, images not decoded."""
    for sample in read_samples(shard, cfg.storage_options, cfg.image_column, cfg.key_column):
        if cfg.split != "all" and split_of(sample.key, cfg.val_fraction) != cfg.split:
            continue
        if sample.error or sample.meta_error:
            yield sample, None, sample.error or sample.meta_error
            continue
        try:
            yield sample, parse_landmarks((sample.meta or {}).get("landmarks")), None
        except SampleError as exc:
            yield sample, None, str(exc)


def _predictor(cfg: EvalConfig):
    """The inference job's predictor, on the model file being evaluated."""
    from pipeline.model.geometry import torch_device
    from pipeline.stages.predictor import LandmarkPredictor, PredictorSettings

    return LandmarkPredictor(PredictorSettings(
        weights=cfg.weights, storage_options=cfg.storage_options,
        device=torch_device(cfg.device), precision=cfg.precision))


def _with_model(cfg: EvalConfig, shards: list[Shard]):
    """Predicted and labelled points (crop units: NME is the same as in pixels), keys, skipped."""
    predictor = _predictor(cfg)
    reader = LabelledReader(
        split=cfg.split,
        val_fraction=cfg.val_fraction,
        margin=cfg.margin,
        max_pixels=cfg.max_pixels,
        storage_options=cfg.storage_options,
        image_column=cfg.image_column,
        key_column=cfg.key_column,
        rows_per_batch=cfg.batch_size,
    )
    keys, preds, targets = [], [], []
    for shard in shards:
        for batch in reader.read(shard):
            outputs = predictor.forward(batch["pixels"])
            preds.append(outputs.reshape(-1, 68, 2))
            targets.append(batch["landmarks"])
            keys += list(batch["key"])
        log.info("%s: %d samples scored so far", shard.uri, len(keys))
    info = {
        "source": cfg.weights,
        "model_version": predictor.info.version,
        "damaged_shards": reader.shard_errors,
    }
    return keys, preds, targets, reader.skipped, 0, info, []


def _with_model_and_detector(cfg: EvalConfig, shards: list[Shard]):
    """Points (pixels) of the detected face that matches each labelled one, as the inference
    job would give them; the labelled faces no face matched."""
    from pipeline.model.detector import landmark_box
    from pipeline.stages.detect import FaceFinder
    from pipeline.stages.labels import bbox_from_landmarks
    from pipeline.stages.preprocess import decode_image, to_pixels

    predictor = _predictor(cfg)
    finder = FaceFinder(cfg.face_threshold, margin=cfg.margin)
    keys, preds, targets, skipped, missed, damaged = [], [], [], 0, [], []
    for shard in shards:
        try:
            for sample, points, error in read_labels(shard, cfg):
                try:
                    if error is not None:
                        raise SampleError(error)
                    image = decode_image(sample.data, cfg.max_pixels)
                except SampleError as exc:
                    skipped += 1
                    log.warning("skipping %s: %s", sample.key, exc)
                    continue
                faces = finder(image)
                found = best_match(np.asarray(bbox_from_landmarks(points)),
                                   landmark_box(np.asarray([f.box for f in faces]).reshape(-1, 4)))
                if found is None:
                    missed.append(sample.key)
                    continue
                face = faces[found]
                outputs = predictor.forward(face.pixels[None])
                preds.append(to_pixels(outputs, [face.crop]))
                targets.append(points[None])
                keys.append(sample.key)
        except Exception as exc:  # a damaged shard: report it, score the rest
            damaged.append(f"{shard.uri}: {exc.__class__.__name__}: {exc}")
        log.info("%s: %d faces scored, %d missed so far", shard.uri, len(keys), len(missed))
    info = {
        "source": cfg.weights,
        "model_version": predictor.info.version,
        "damaged_shards": damaged,
        "detect": "always",
    }
    return keys, preds, targets, skipped, 0, info, missed


def _with_predictions(cfg: EvalConfig, shards: list[Shard]):
    """Points from the inference job's Parquet files, matched to the labels by key."""
    import pyarrow.parquet as pq

    from pipeline.io.storage import filesystem

    fs, root = filesystem(cfg.predictions, cfg.storage_options)

    def visible(path: str) -> bool:  # not a temporary file of a write in progress
        return path.endswith(".parquet") and not path.rsplit("/", 1)[-1].startswith((".", "_"))

    from pipeline.model.detector import landmark_box
    from pipeline.stages.labels import bbox_from_landmarks

    files = [root] if fs.isfile(root) else sorted(filter(visible, fs.find(root)))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {cfg.predictions}")
    # key -> [(landmarks, detector box or None)]: one row per key, or one per detected face
    predicted: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {}
    searched = set()  # keys searched for faces and found without one
    versions = set()
    for path in files:
        with fs.open(path, "rb") as f:
            names = pq.read_schema(f).names
            f.seek(0)
            # error_kind and the face columns are the inference job's; other writers may
            # give key, landmarks, error and model_version only.
            wanted = ["key", "landmarks", "error", "model_version", "status", "error_kind",
                      "face_box"]
            table = pq.read_table(f, columns=[c for c in wanted if c in names])
        for row in table.to_pylist():
            # status no_face; files written before the status column: error_kind no_face
            if NO_FACE in (row.get("status"), row.get("error_kind")):
                searched.add(row["key"])
            elif row["error"] is None and row["landmarks"] is not None:
                rows = predicted.setdefault(row["key"], [])
                box = row.get("face_box")
                if rows and (box is None or rows[0][1] is None):
                    raise BadInput(f"key {row['key']!r} appears twice in {cfg.predictions}")
                rows.append((np.asarray(row["landmarks"], dtype=np.float64),
                             None if box is None else np.asarray(box, dtype=np.float64)))
                versions.add(row["model_version"])
    keys, preds, targets, skipped, missing, damaged, missed = [], [], [], 0, 0, [], []
    for shard in shards:
        try:
            labels = [(sample.key, points, error)  # keys only: the images are not kept
                      for sample, points, error in read_labels(shard, cfg)]
        except Exception as exc:  # a damaged shard: report it, score the rest
            damaged.append(f"{shard.uri}: {exc.__class__.__name__}: {exc}")
            continue
        for key, points, error in labels:
            if error is not None:
                skipped += 1
                log.warning("skipping %s: %s", key, error)
            elif key not in predicted:
                if key in searched:
                    missed.append(key)  # searched for faces: none found
                else:
                    missing += 1
            else:
                rows = predicted[key]
                if rows[0][1] is None:  # a sidecar box, or no detection: the one row
                    found = 0
                else:  # detected faces: the one over the labelled face, if any
                    found = best_match(np.asarray(bbox_from_landmarks(points)),
                                       landmark_box(np.stack([box for _, box in rows])))
                if found is None:
                    missed.append(key)
                    continue
                keys.append(key)
                preds.append(rows[found][0][None])
                targets.append(points[None])
    info = {
        "source": cfg.predictions,
        "model_version": ",".join(sorted(versions)),
        "damaged_shards": damaged,
    }
    return keys, preds, targets, skipped, missing, info, missed


def main(cfg: EvalConfig) -> dict[str, Any]:
    """Score the predictions, write the JSON report and the CED plot; returns the report."""
    from pipeline.io.storage import write_bytes

    shards = list_shards(cfg.labels, cfg.format, cfg.storage_options)
    if cfg.weights:
        run = _with_model_and_detector if cfg.detect == "always" else _with_model
    else:
        run = _with_predictions
    keys, preds, targets, skipped, missing, info, missed = run(cfg, shards)
    if not keys and not missed:
        raise BadInput(
            f"no labelled sample of split {cfg.split!r} could be scored "
            f"({skipped} unusable, {missing} without a prediction)"
        )
    shape = (0, 68, 2)
    pred = np.concatenate(preds) if preds else np.zeros(shape)
    target = np.concatenate(targets) if targets else np.zeros(shape)
    per_sample = nme(pred, target)
    # A labelled face that detection missed is a failure: an infinite NME in the failure rate,
    # the AUC and the CED curve (not in the mean NME, which is over the faces scored).
    with_misses = np.concatenate([per_sample, np.full(len(missed), np.inf)])
    t = cfg.threshold
    order = np.argsort(per_sample)[::-1][: cfg.worst]
    report = {
        "labels": cfg.labels,
        "split": cfg.split,
        **info,
        **summarize(pred, target, t),
        f"failure_rate@{t:g}": failure_rate(with_misses, t),
        f"auc@{t:g}": auc(with_misses, t),
        "missed_faces": len(missed),
        "missed": missed[: cfg.worst],
        "threshold": t,
        "skipped_labels": skipped,
        "missing_predictions": missing,
        "worst": [[keys[i], float(per_sample[i])] for i in order],
        "ced_png": cfg.ced_uri,
        "report_html": report_page_uri(cfg.report),
        "config": {**asdict(cfg), "storage_options": sorted(cfg.storage_options)},
    }
    write_bytes(cfg.report, json.dumps(report, indent=2).encode(), cfg.storage_options)
    plot_ced(
        {cfg.split if cfg.split != "all" else "all": with_misses},
        cfg.ced_uri,
        cfg.threshold,
        cfg.storage_options,
    )
    errors, fractions = ced_curve(with_misses, t)
    write_bytes(report["report_html"], render_evaluation(report, errors, fractions).encode(),
                cfg.storage_options)
    return report


def report_line(report: Mapping[str, Any]) -> str:
    """One human line of a report."""
    t = report["threshold"]
    missed = report.get("missed_faces", 0)
    return (
        f"{report['samples']} samples: NME {100 * report['nme']:.2f} %, failure rate@{t:g} "
        f"{100 * report[f'failure_rate@{t:g}']:.1f} %, AUC@{t:g} {report[f'auc@{t:g}']:.3f}"
        + (f" ({missed} labelled faces not found, counted as failures)" if missed else "")
    )
