"""A run's end figures, pushed to a Prometheus Pushgateway so that a night that fails pages
someone (``--pushgateway URL``; ``deploy/prometheus/alerts.yaml`` has the alerting rules).

Every inference, nightly and fine-tuning run pushes, at its end, to the group of its job and
output (``job="landmarks_<command>"``, ``output=<its output, credentials stripped>``), replacing
what the last run there pushed: ``landmarks_last_run_timestamp_seconds``,
``landmarks_last_run_success`` (1 or 0), ``landmarks_last_run_duration_seconds``,
``landmarks_last_run_rows`` (images; training images for fine-tuning),
``landmarks_last_run_errors`` and ``landmarks_last_run_errors_by_kind{kind=...}``. A run that
succeeded also replaces ``landmarks_last_success_timestamp_seconds`` in a group of its own (the
same labels and ``outcome="success"``), which a failed run leaves alone: "no success for 26 h"
stays true until a run succeeds, and a kind of error that did not recur leaves no stale series.

Plain HTTP (urllib) in Prometheus' text format; no client library. A push that fails (gateway
down, refused) is logged and never changes the run's outcome or exit status.
"""

from __future__ import annotations

import base64
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 10.0


@dataclass
class RunOutcome:
    """What a run reports at its end; ``success`` stays False unless the run says otherwise."""

    job: str
    output: str
    started: float = field(default_factory=time.time)
    finished: float | None = None
    success: bool = False
    rows: int = 0
    errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)


# name -> (help, value of an outcome); the errors by kind are one family with a label.
_GAUGES = {
    "landmarks_last_run_timestamp_seconds": ("when the last run ended (Unix time)",
                                             lambda o: o.finished),
    "landmarks_last_run_success": ("1 if the last run succeeded, else 0",
                                   lambda o: int(o.success)),
    "landmarks_last_run_duration_seconds": ("how long the last run took",
                                            lambda o: o.finished - o.started),
    "landmarks_last_run_rows": ("images the last run processed (training images for "
                                "fine-tuning)", lambda o: o.rows),
    "landmarks_last_run_errors": ("error rows of the last run", lambda o: o.errors),
}
LAST_SUCCESS = "landmarks_last_success_timestamp_seconds"
ERRORS_BY_KIND = "landmarks_last_run_errors_by_kind"


def exposition(outcome: RunOutcome) -> str:
    """The last-run figures in Prometheus' text exposition format (gauges, no timestamps);
    ``outcome.finished`` is set."""
    lines: list[str] = []
    for name, (help_text, value) in _GAUGES.items():
        _gauge(lines, name, help_text, [("", value(outcome))])
    kinds = sorted(outcome.errors_by_kind.items())
    if kinds:
        _gauge(lines, ERRORS_BY_KIND, "error rows of the last run by kind",
               [(f'{{kind="{_label(k)}"}}', n) for k, n in kinds])
    return "\n".join(lines) + "\n"


def success_exposition(outcome: RunOutcome) -> str:
    lines: list[str] = []
    _gauge(lines, LAST_SUCCESS, "when the last successful run ended (Unix time)",
           [("", outcome.finished)])
    return "\n".join(lines) + "\n"


def _gauge(lines: list[str], name: str, help_text: str, samples) -> None:
    lines.extend((f"# HELP {name} {help_text}", f"# TYPE {name} gauge"))
    lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)


def group_url(gateway: str, job: str, output: str, outcome: str | None = None) -> str:
    """A group's URL: ``job``, ``output`` (base64 in the path: outputs hold slashes) and, for
    the last success, ``outcome``."""
    base = gateway.rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    encoded = base64.urlsafe_b64encode(public_uri(output).encode()).decode().rstrip("=")
    url = (f"{base}/metrics/job/{urllib.parse.quote(job, safe='')}/output@base64/"
           f"{encoded or '='}")
    return f"{url}/outcome/{outcome}" if outcome else url


def push(gateway: str, outcome: RunOutcome, timeout: float = PUSH_TIMEOUT_S) -> bool:
    """Push ``outcome`` (and, if it succeeded, the last success); True when the gateway took
    everything. Never raises."""
    if outcome.finished is None:
        outcome.finished = time.time()
    body = exposition(outcome)
    pushes = [(group_url(gateway, outcome.job, outcome.output), body)]
    if outcome.success:
        pushes.append((group_url(gateway, outcome.job, outcome.output, "success"),
                       success_exposition(outcome)))
    shown = public_uri(gateway)
    for url, text in pushes:
        request = urllib.request.Request(url, data=text.encode(), method="PUT",
                                         headers={"Content-Type": "text/plain; version=0.0.4"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            log.warning("could not push the run's figures to the Pushgateway %s: %s", shown,
                        reason)
            return False
    log.info("run figures pushed to the Pushgateway %s (job %s, %s)", shown, outcome.job,
             "success" if outcome.success else "failure")
    return True


def public_uri(uri: str) -> str:
    """``uri`` without credentials: no user or password, no query string (presigned URLs)."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _number(value: float) -> str:
    value = float(value)
    return repr(value) if math.isfinite(value) else ("NaN" if math.isnan(value) else
                                                     ("+Inf" if value > 0 else "-Inf"))


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def errors_by_kind(entries: list[Mapping]) -> dict[str, int]:
    """The sum of several ``errors_by_kind`` mappings (a nightly run's dates)."""
    out: dict[str, int] = {}
    for entry in entries:
        for kind, n in (entry.get("errors_by_kind") or {}).items():
            out[kind] = out.get(kind, 0) + int(n)
    return out
