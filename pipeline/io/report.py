"""What a run did: the summary line, the verdict behind the exit status, and the manifest.

The manifest is written as the run goes, never as one object that grows with the archive:
the receipt of every committed file (one JSON line each) goes into
``_manifest/<run id>/part-NNNNN.jsonl``, a part written whole every ``PART_RECEIPTS`` receipts
or ``PART_SECONDS`` seconds; ``_manifest.json`` (small: counts, status, config, the part names)
is written at the end and names the run's parts.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.io.storage import read_bytes, write_bytes

MANIFEST_FILE = "_manifest.json"
MANIFEST_DIR = "_manifest"
PART_RECEIPTS = 10_000
PART_SECONDS = 60.0
FILES_KEPT = 100_000  # file names a summary keeps in memory (the manifest parts have them all)


# The detector scores of the faces a run found, counted in bins of 0.05 (the manifest's
# ``face_scores``): many faces just above --face-threshold say that more lie just below it.
FACE_SCORE_EDGES = tuple(round(0.05 * i, 2) for i in range(21))


def face_score_counts(scores) -> list[int]:
    """How many of ``scores`` (NaN: no face) fall in each bin of ``FACE_SCORE_EDGES``."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    return np.histogram(scores[np.isfinite(scores)], bins=FACE_SCORE_EDGES)[0].tolist()


@dataclass
class Summary:
    """What a run did. ``samples`` counts this run's input samples (images), ``errors`` its
    error rows (an image without a face is not one: ``no_face``); skipped shards were
    complete from an earlier run with the same model and settings."""

    shards: int
    samples: int
    errors: int
    seconds: float
    model_version: str
    output: str
    files: list[str]
    skipped_shards: int = 0
    skipped_rows: int = 0
    skipped_errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    failed_shards: list[str] = field(default_factory=list)
    max_error_fraction: float = 0.01
    files_committed: int = 0
    output_bytes: int = 0
    commit_cpu_s: float = 0.0
    predictor_calls: int = 0
    rows_per_call: dict[str, float] = field(default_factory=dict)
    faces: int = 0  # rows of detected faces (images searched for faces: --detect)
    no_face: int = 0  # images searched and found without a face (not errors)
    face_scores: list[int] = field(default_factory=list)  # faces per FACE_SCORE_EDGES bin
    device_decoded: int = 0  # --decode gpu: images the predictors decoded on their device
    cpu_fallbacks: dict[str, int] = field(default_factory=dict)  # ... and those that took the
    #                                      CPU path instead, by reason (gpu_decode.FALLBACK_REASONS)
    placement: dict[str, Any] = field(default_factory=dict)  # leases, node agents, and the
    #                                      share of unit and row bytes that crossed nodes
    rows: int = 0  # rows written (one per face found, else one per image)
    commit_s: float = 0.0
    commit_retries: int = 0
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (run_figures)
    busy_fraction: float = 0.0  # the predictors' time in the model / time held
    retries: dict[str, int] = field(default_factory=dict)  # by stage, and restarts
    cost: dict[str, Any] = field(default_factory=dict)  # GPU- and CPU-seconds (cost_figures)
    report: str | None = None  # the run report's URI (pipeline.report.run)

    @property
    def images_per_s(self) -> float:
        return (self.samples - self.errors) / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> bool:
        """A shard stopped part-way, or too large a share of the output's rows (this run's and
        the skipped shards') are errors."""
        rows = self.samples + self.skipped_rows
        fraction = (self.errors + self.skipped_errors) / rows if rows else 0.0
        return bool(self.failed_shards) or fraction > self.max_error_fraction

    def add(self, receipt: Mapping[str, Any]) -> None:
        """Count one committed file's receipt."""
        self.files_committed += 1
        if len(self.files) < FILES_KEPT:
            self.files.append(f"{self.output}/{receipt['file']}")
        self.samples += receipt.get("images", receipt["rows"])
        self.rows += receipt["rows"]
        self.commit_s += receipt.get("seconds", 0.0)
        self.commit_retries += receipt.get("attempt", 0)
        self.faces += receipt.get("faces", 0)
        self.no_face += receipt.get("no_face", 0)
        if receipt.get("face_scores"):
            self.face_scores = [a + b for a, b in zip(
                self.face_scores or [0] * (len(FACE_SCORE_EDGES) - 1), receipt["face_scores"],
                strict=True)]
        self.errors += receipt["errors"]
        for kind, n in receipt["errors_by_kind"].items():
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + n
        if receipt["shard_failed"]:
            self.failed_shards.append(receipt["shard"])
        self.output_bytes += receipt.get("bytes", 0)
        self.commit_cpu_s += receipt.get("cpu_s", 0.0)

    def line(self) -> str:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_kind.items()))
        found = (f", {self.faces} faces found, {self.no_face} images without a face"
                 if self.faces or self.no_face else "")
        if self.device_decoded or self.cpu_fallbacks:
            found += f", {decode_text(self.device_decoded, self.cpu_fallbacks)}"
        return (f"{self.samples} samples in {self.shards - self.skipped_shards} shards "
                f"({self.skipped_shards} already done){found}, {self.errors} errors"
                f"{f' ({kinds})' if kinds else ''}, {self.seconds:.1f} s, "
                f"{self.images_per_s:.1f} images/s (model {self.model_version}) -> {self.output}"
                f" [{'FAILED' if self.failed else 'OK'}]")


def decode_text(device_decoded: int, cpu_fallbacks: Mapping[str, int]) -> str:
    """``N images decoded on the device, M on the CPU instead (reason: n, ...)``."""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(cpu_fallbacks.items()))
    return (f"{device_decoded} images decoded on the device, {sum(cpu_fallbacks.values())} on "
            f"the CPU instead{f' ({reasons})' if reasons else ''}")


def fallback_share(device_decoded: int, cpu_fallbacks: Mapping[str, int]) -> float:
    """The share of the images the predictors decoded that took the CPU path."""
    fallbacks = sum(cpu_fallbacks.values())
    return fallbacks / (device_decoded + fallbacks) if fallbacks else 0.0


def cost_figures(rows: int, gpu_s: float, cpu_s: float,
                 gpu_hour_price: float | None = None) -> dict[str, Any]:
    """What the run cost: GPU-seconds held by the predictors and CPU-seconds the stages used,
    in all and per million rows written, and in money with a price of one GPU hour."""
    def per_million(value: float) -> float | None:
        return round(value * 1e6 / rows, 3) if rows else None

    out: dict[str, Any] = {"rows": rows, "gpu_s": round(gpu_s, 3), "cpu_s": round(cpu_s, 3),
                           "gpu_s_per_million_rows": per_million(gpu_s),
                           "cpu_s_per_million_rows": per_million(cpu_s)}
    if gpu_hour_price is not None:
        money = gpu_s / 3600 * gpu_hour_price
        out.update(gpu_hour_price=gpu_hour_price, gpu_cost=round(money, 4),
                   gpu_cost_per_million_rows=per_million(money))
    return out


def run_figures(summary: Summary, stats, ended: float,
                gpu_hour_price: float | None = None) -> None:
    """Set ``summary``'s stage seconds, busy fraction, retries and cost from the predictors'
    figures (``executor.RunStats``; None when nothing ran) and its ``placement`` (agents
    restarted, leases lost) at the end of the run."""
    placement = summary.placement
    predictors = stats.predictor_figures(ended) if stats is not None else {}
    summary.stages = {
        "read_s": round(stats.read_s, 3) if stats else 0.0,
        "read_cpu_s": round(stats.read_cpu_s, 3) if stats else 0.0,
        "predict_s": round(stats.predict_s, 3) if stats else 0.0,
        "predict_busy_s": predictors.get("busy_s", 0.0),
        "predict_cpu_s": predictors.get("cpu_s", 0.0),
        "commit_s": round(summary.commit_s, 3),
        "commit_cpu_s": round(summary.commit_cpu_s, 3),
    }
    summary.busy_fraction = predictors.get("busy_fraction", 0.0)
    summary.retries = {
        "read": stats.read_retries if stats else 0,
        "predict": stats.predict_retries if stats else 0,
        "commit": summary.commit_retries,
        "predictor_restarts": predictors.get("predictor_restarts", 0),
        "agent_restarts": placement.get("agent_restarts", 0),
        "leases_lost": placement.get("leases_lost", 0),
    }
    cpu_s = (summary.stages["read_cpu_s"] + summary.stages["predict_cpu_s"]
             + summary.stages["commit_cpu_s"])
    summary.cost = cost_figures(summary.rows, predictors.get("gpu_s", 0.0), cpu_s,
                                gpu_hour_price)


def new_run_id(now: datetime | None = None) -> str:
    """Time-ordered and unique: names this run's manifest parts."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class ManifestWriter:
    """Receipts in, JSON-lines parts out: memory bounded by one part, one write per part."""

    def __init__(self, output: str, run_id: str,
                 storage_options: Mapping[str, Any] | None = None,
                 part_receipts: int = PART_RECEIPTS, part_seconds: float = PART_SECONDS):
        self.output, self.run_id = output.rstrip("/"), run_id
        self.storage_options = storage_options
        self.part_receipts, self.part_seconds = part_receipts, part_seconds
        self.buffer: list[str] = []
        self.parts: list[str] = []
        self.since = time.monotonic()

    def add(self, receipt: Mapping[str, Any]) -> None:
        self.buffer.append(json.dumps(receipt, sort_keys=True))
        if (len(self.buffer) >= self.part_receipts
                or time.monotonic() - self.since >= self.part_seconds):
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            name = f"{MANIFEST_DIR}/{self.run_id}/part-{len(self.parts):05d}.jsonl"
            write_bytes(f"{self.output}/{name}", ("\n".join(self.buffer) + "\n").encode(),
                        self.storage_options)
            self.parts.append(name)
            self.buffer = []
        self.since = time.monotonic()


def write_manifest(config: dict[str, Any], summary: Summary, writer: ManifestWriter,
                   start: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """``_manifest.json`` beside the output: what ran, on what, with which outcome, and the
    parts that list every file this run committed."""
    writer.flush()
    manifest = {
        "config": config,
        "run_id": writer.run_id,
        "model_version": summary.model_version,
        "started": start,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "failed" if summary.failed else "ok",
        "shards": summary.shards,
        "shards_skipped": summary.skipped_shards,
        "samples": summary.samples,
        "samples_skipped": summary.skipped_rows,
        "faces": summary.faces,
        "no_face": summary.no_face,
        "face_scores": {"edges": list(FACE_SCORE_EDGES), "counts": summary.face_scores,
                        "threshold": config.get("face_threshold")} if summary.faces else None,
        "errors": summary.errors,
        "errors_by_kind": summary.errors_by_kind,
        "failed_shards": summary.failed_shards,
        "files": summary.files_committed,
        "output_bytes": summary.output_bytes,
        "commit_cpu_s": round(summary.commit_cpu_s, 3),
        "predictor_calls": summary.predictor_calls,
        "rows_per_call": summary.rows_per_call,
        "device_decode": {"decoded_on_device": summary.device_decoded,
                          "cpu_fallbacks": summary.cpu_fallbacks},
        "placement": summary.placement,
        "rows": summary.rows,
        "stages": summary.stages,
        "predictor_busy_fraction": summary.busy_fraction,
        "retries": summary.retries,
        "cost": summary.cost,
        "seconds": round(summary.seconds, 3),
        "images_per_s": round(summary.images_per_s, 3),
        "receipts": writer.parts,
    }
    data = json.dumps(manifest, indent=2).encode()
    # Every run's manifest stays beside its parts (``landmarks report --run``); the latest is
    # also _manifest.json.
    write_bytes(f"{summary.output}/{run_manifest_name(writer.run_id)}", data, storage_options)
    write_bytes(f"{summary.output}/{MANIFEST_FILE}", data, storage_options)


def run_manifest_name(run_id: str) -> str:
    return f"{MANIFEST_DIR}/{run_id}/manifest.json"


def read_manifest(output: str, run_id: str | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of run ``run_id`` of ``output`` (default: the latest run's)."""
    name = run_manifest_name(run_id) if run_id else MANIFEST_FILE
    return json.loads(read_bytes(f"{output.rstrip('/')}/{name}", storage_options))


def read_receipts(output: str, storage_options: Mapping[str, Any] | None = None,
                  manifest: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every receipt of the run ``manifest`` describes (default: the one that wrote
    ``output``'s ``_manifest.json``), in commit order."""
    root = output.rstrip("/")
    if manifest is None:
        manifest = read_manifest(root, None, storage_options)
    receipts = []
    for part in manifest["receipts"]:
        text = read_bytes(f"{root}/{part}", storage_options).decode()
        receipts.extend(json.loads(line) for line in text.splitlines() if line)
    return receipts
