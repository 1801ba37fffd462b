"""Live figures of an inference run in Prometheus, through Ray's metrics API.

Each process records what it does with ``ray.util.metrics``; Ray's per-node metrics agent
exports them on the node's metrics port (``ray start --metrics-export-port``), which KubeRay's
Prometheus setup scrapes. Ray prefixes every name with ``ray_``: ``landmarks_rows_committed_total``
here is ``ray_landmarks_rows_committed_total`` in Prometheus (``deploy/grafana/landmarks.json``
queries those). Tags are few and bounded: an error kind, a decode fallback's reason; never a
shard, key or run (Ray adds its own node and session tags).

Where each figure is counted:

- the driver, as it accepts a committed file's receipt (once per file, however often a commit
  ran: retries and speculative leases do not count twice): rows, files, errors by kind,
  ``no_face``, faces and bytes written;
- the read tasks: samples read and decoded bytes sent on, seconds per unit;
- the predictor actors: rows predicted, seconds per call, seconds busy (busy fraction =
  ``rate(busy_seconds_total)`` per predictor), images decoded on the device and fallbacks to
  the CPU by reason;
- the commit tasks: seconds per commit; the node agents: units in flight;
- retries where they run again (a read task, a predictor call, a commit: Ray's attempt number),
  restarts where a process starts again (a predictor actor; a node agent, on the driver).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

# Seconds per unit (read, predict) and per commit: 10 ms to 2 minutes.
SECONDS_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]

COUNTERS = {  # name -> (description, tag keys)
    "landmarks_samples_read_total": ("input samples (images) read", ()),
    "landmarks_input_bytes_total": ("bytes of the images read from the input", ()),
    "landmarks_unit_bytes_total": ("bytes of the units the read tasks sent to the predictors",
                                   ()),
    "landmarks_rows_predicted_total": ("rows through the predictors", ()),
    "landmarks_predictor_busy_seconds_total": ("seconds the predictors spent on units", ()),
    "landmarks_device_decoded_total": ("images decoded on the predictors' device", ()),
    "landmarks_decode_fallbacks_total": ("images that took the CPU path instead of the "
                                         "device decoder, by reason", ("reason",)),
    "landmarks_rows_committed_total": ("rows written to committed output files", ()),
    "landmarks_files_committed_total": ("output files committed", ()),
    "landmarks_errors_total": ("error rows committed, by kind", ("kind",)),
    "landmarks_no_face_total": ("images searched for faces and found without one", ()),
    "landmarks_faces_total": ("face rows committed (images searched for faces)", ()),
    "landmarks_bytes_written_total": ("bytes of committed output files", ()),
    "landmarks_retries_total": ("read tasks, predictor calls and commits Ray ran again, by "
                                "stage (read, predict, commit)", ("stage",)),
    "landmarks_restarts_total": ("predictor actors and node agents started again after their "
                                 "process died, by stage (predict, agent)", ("stage",)),
}
HISTOGRAMS = {
    "landmarks_read_unit_seconds": "seconds a read task took to build one unit",
    "landmarks_predict_unit_seconds": "seconds a predictor call took",
    "landmarks_commit_seconds": "seconds one commit task took",
}
GAUGES = {
    "landmarks_units_in_flight": "units sent to the predictors and not yet back, per node agent",
}
ALL = (*COUNTERS, *HISTOGRAMS, *GAUGES)


@functools.cache
def _metrics() -> dict[str, Any]:
    from ray.util.metrics import Counter, Gauge, Histogram

    out: dict[str, Any] = {}
    for name, (description, tags) in COUNTERS.items():
        out[name] = Counter(name, description=description, tag_keys=tags)
    for name, description in HISTOGRAMS.items():
        out[name] = Histogram(name, description=description, boundaries=SECONDS_BUCKETS)
    for name, description in GAUGES.items():
        out[name] = Gauge(name, description=description)
    return out


def count(name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
    if value:
        _metrics()[name].inc(value, tags=dict(tags) if tags else None)


def observe(name: str, seconds: float) -> None:
    _metrics()[name].observe(seconds)


def set_gauge(name: str, value: float) -> None:
    _metrics()[name].set(value)


def committed(receipt: Mapping[str, Any]) -> None:
    """A committed file's receipt, as the driver accepts it (once per file)."""
    count("landmarks_files_committed_total", 1)
    count("landmarks_rows_committed_total", receipt.get("rows", 0))
    count("landmarks_no_face_total", receipt.get("no_face", 0))
    count("landmarks_faces_total", receipt.get("faces", 0))
    count("landmarks_bytes_written_total", receipt.get("bytes", 0))
    for kind, n in (receipt.get("errors_by_kind") or {}).items():
        count("landmarks_errors_total", n, {"kind": kind})
