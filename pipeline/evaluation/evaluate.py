"""The evaluation job: labelled shards + (a model file or the inference job's Parquet) -> report.

With a model file, each labelled sample is cropped exactly as the inference job crops it (the
sidecar ``bbox``, else the landmarks' extent, grown by ``margin``) and run through the inference
predictor, in this process. For archives too large for one process, run the inference job on the
cluster and evaluate its Parquet output with ``predictions``: rows are matched to labels by key.
Writes a JSON report (inter-ocular NME, failure rate and AUC at the threshold, NME per region, the
worst samples) and a PNG of the cumulative error distribution.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline.evaluation.config import EvalConfig
from pipeline.io.shards import Shard, list_shards, read_samples
from pipeline.model.metrics import nme, plot_ced, summarize
from pipeline.stages.labels import LabelledReader, parse_landmarks, split_of
from pipeline.stages.preprocess import SampleError

log = logging.getLogger("pipeline")


def read_labels(
    shard: Shard, cfg: EvalConfig
) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """``(key, landmarks in pixels or None, error or None)`` of one shard, images not decoded."""
    for sample in read_samples(shard, cfg.storage_options, cfg.image_column, cfg.key_column):
        if cfg.split != "all" and split_of(sample.key, cfg.val_fraction) != cfg.split:
            continue
        if sample.error or sample.meta_error:
            yield sample.key, None, sample.error or sample.meta_error
            continue
        try:
            yield sample.key, parse_landmarks((sample.meta or {}).get("landmarks")), None
        except SampleError as exc:
            yield sample.key, None, str(exc)


def _with_model(cfg: EvalConfig, shards: list[Shard]):
    """Predicted and labelled points (crop units: NME is the same as in pixels), keys, skipped."""
    from pipeline.stages.predictor import LandmarkPredictor

    predictor = LandmarkPredictor(
        weights=cfg.weights, storage_options=cfg.storage_options, device=cfg.device
    )
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
    return keys, preds, targets, reader.skipped, 0, info


def _with_predictions(cfg: EvalConfig, shards: list[Shard]):
    """Points from the inference job's Parquet files, matched to the labels by key."""
    import pyarrow.parquet as pq

    from pipeline.io.storage import filesystem

    fs, root = filesystem(cfg.predictions, cfg.storage_options)

    def visible(path: str) -> bool:  # not a temporary file of a write in progress
        return path.endswith(".parquet") and not path.rsplit("/", 1)[-1].startswith((".", "_"))

    files = [root] if fs.isfile(root) else sorted(filter(visible, fs.find(root)))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {cfg.predictions}")
    predicted: dict[str, np.ndarray] = {}
    versions = set()
    for path in files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["key", "landmarks", "error", "model_version"])
        for row in table.to_pylist():
            if row["error"] is None and row["landmarks"] is not None:
                if row["key"] in predicted:
                    raise ValueError(f"key {row['key']!r} appears twice in {cfg.predictions}")
                predicted[row["key"]] = np.asarray(row["landmarks"], dtype=np.float64)
                versions.add(row["model_version"])
    keys, preds, targets, skipped, missing, damaged = [], [], [], 0, 0, []
    for shard in shards:
        try:
            labels = list(read_labels(shard, cfg))
        except Exception as exc:  # a damaged shard: report it, score the rest
            damaged.append(f"{shard.uri}: {exc.__class__.__name__}: {exc}")
            continue
        for key, points, error in labels:
            if error is not None:
                skipped += 1
                log.warning("skipping %s: %s", key, error)
            elif key not in predicted:
                missing += 1
            else:
                keys.append(key)
                preds.append(predicted[key][None])
                targets.append(points[None])
    info = {
        "source": cfg.predictions,
        "model_version": ",".join(sorted(versions)),
        "damaged_shards": damaged,
    }
    return keys, preds, targets, skipped, missing, info


def main(cfg: EvalConfig) -> dict[str, Any]:
    """Score the predictions, write the JSON report and the CED plot; returns the report."""
    from pipeline.io.storage import write_bytes

    shards = list_shards(cfg.labels, cfg.format, cfg.storage_options)
    run = _with_model if cfg.weights else _with_predictions
    keys, preds, targets, skipped, missing, info = run(cfg, shards)
    if not keys:
        raise ValueError(
            f"no labelled sample of split {cfg.split!r} could be scored "
            f"({skipped} unusable, {missing} without a prediction)"
        )
    pred, target = np.concatenate(preds), np.concatenate(targets)
    per_sample = nme(pred, target)
    order = np.argsort(per_sample)[::-1][: cfg.worst]
    report = {
        "labels": cfg.labels,
        "split": cfg.split,
        **info,
        **summarize(pred, target, cfg.threshold),
        "threshold": cfg.threshold,
        "skipped_labels": skipped,
        "missing_predictions": missing,
        "worst": [[keys[i], float(per_sample[i])] for i in order],
        "ced_png": cfg.ced_uri,
        "config": {**asdict(cfg), "storage_options": sorted(cfg.storage_options)},
    }
    write_bytes(cfg.output, json.dumps(report, indent=2).encode(), cfg.storage_options)
    plot_ced(
        {cfg.split if cfg.split != "all" else "all": per_sample},
        cfg.ced_uri,
        cfg.threshold,
        cfg.storage_options,
    )
    return report


def report_line(report: Mapping[str, Any]) -> str:
    """One human line of a report."""
    t = report["threshold"]
    return (
        f"{report['samples']} samples: NME {100 * report['nme']:.2f} %, failure rate@{t:g} "
        f"{100 * report[f'failure_rate@{t:g}']:.1f} %, AUC@{t:g} {report[f'auc@{t:g}']:.3f}"
    )
