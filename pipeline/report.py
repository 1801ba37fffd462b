"""What a run did: the summary line, the verdict behind the exit status, ``_manifest.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.storage import write_bytes


@dataclass
class Summary:
    """What a run did. ``samples``/``errors`` count this run's rows; skipped shards were
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

    def line(self) -> str:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_kind.items()))
        return (f"{self.samples} samples in {self.shards - self.skipped_shards} shards "
                f"({self.skipped_shards} already done), {self.errors} errors"
                f"{f' ({kinds})' if kinds else ''}, {self.seconds:.1f} s, "
                f"{self.images_per_s:.1f} images/s (model {self.model_version}) -> {self.output}"
                f" [{'FAILED' if self.failed else 'OK'}]")


def write_manifest(config: dict[str, Any], summary: Summary, per_shard: dict, skipped: dict,
                   start: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """``_manifest.json`` beside the output: what ran, on what, with which outcome."""
    manifest = {
        "config": config,
        "model_version": summary.model_version,
        "started": start,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status": "failed" if summary.failed else "ok",
        "shards": summary.shards,
        "shards_skipped": sorted(skipped),
        "samples": summary.samples,
        "errors": summary.errors,
        "errors_by_kind": summary.errors_by_kind,
        "failed_shards": summary.failed_shards,
        "per_shard": per_shard,
        "seconds": round(summary.seconds, 3),
        "images_per_s": round(summary.images_per_s, 3),
        "files": summary.files,
    }
    write_bytes(f"{summary.output}/_manifest.json", json.dumps(manifest, indent=2).encode(),
                storage_options)
