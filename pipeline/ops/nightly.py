"""Nightly incremental runs: ``landmarks nightly`` and its ledger, ``landmarks ledger``.

Inputs arrive under date partitions, ``INPUT/date=YYYY-MM-DD/`` (or any layout given as a
template with ``{date}``, e.g. ``s3://bucket/incoming/{date}/``). A nightly run takes one date
(``--date``, default yesterday in UTC) or every existing partition from ``--since`` to
``--date``, and runs the inference job on each partition into the matching output partition,
``OUTPUT/date=YYYY-MM-DD/``. Which shards to do is the inference job's own resume logic: a shard
whose completion record matches the current input bytes, model version and settings is skipped,
so running the same night twice does no work the second time and a shard that arrived since the
last run is processed alone.

Every run leaves one JSON record in ``OUTPUT/_ledger/<start>-<id>.json``: written as "running"
when the run starts, rewritten after each date and at the end (one whole-object write each time;
object stores cannot append), so a killed run leaves a record that says it never finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import re
import secrets
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from typing import Any

from pipeline.config.errors import BadInput, PipelineError
from pipeline.inference.config import InferConfig
from pipeline.io.output import shard_of, stem_of
from pipeline.io.pushgateway import errors_by_kind
from pipeline.io.report import cost_figures
from pipeline.io.storage import filesystem, redact, redact_values, retry, write_bytes

log = logging.getLogger("pipeline")

DATE_FIELD = "{date}"
LEDGER_DIR = "_ledger"
LEDGER_VERSION = 1
_DATE_RE = r"\d{4}-\d{2}-\d{2}"
_PARTITION_RE = re.compile(rf"date=({_DATE_RE})")
# Per-run selections, not job settings: never saved in the output's _config.yaml (a saved
# config reused with --config would otherwise pin every later night to one date).
RUN_OPTIONS = ("date", "since")



# ---------------------------------------------------------------------------------------------
# Dates and partitions


def parse_date(text: str) -> str:
    """argparse ``type=`` for ``--date`` / ``--since``: a valid ``YYYY-MM-DD``, kept as text."""
    if not re.fullmatch(_DATE_RE, str(text)):
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, got {text!r}")
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid date {text!r}: {exc}") from None


def default_date(now: datetime | None = None) -> str:
    """Yesterday in UTC: the night that has just finished."""
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is not None:
        now = now.astimezone(timezone.utc)
    return (now.date() - timedelta(days=1)).isoformat()


def partition_uri(root: str, day: str) -> str:
    """The partition of ``day`` under ``root``: ``root`` with ``{date}`` filled in when it holds
    the field, else ``root/date=YYYY-MM-DD``."""
    if DATE_FIELD in root:
        return root.replace(DATE_FIELD, day)
    return f"{root.rstrip('/')}/date={day}"


def root_of(uri: str) -> str:
    """The fixed part of a partition layout: ``uri`` itself, or for a template the folder
    before ``{date}`` (``s3://b/in/{date}/`` -> ``s3://b/in``)."""
    if DATE_FIELD not in uri:
        return uri.rstrip("/") or uri
    head = uri[: uri.index(DATE_FIELD)]
    root = head.rsplit("/", 1)[0] if "/" in head else ""
    if not root or root.endswith(":/") or root.endswith(":"):
        raise BadInput(f"{uri}: a {DATE_FIELD} template needs a fixed folder before "
                         f"{DATE_FIELD} (e.g. s3://bucket/incoming/{DATE_FIELD}/)")
    return root


def _template_regex(path: str) -> re.Pattern:
    """A regex matching the filesystem paths of ``path`` (a template) and capturing the date."""
    parts = [re.escape(p).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
             for p in path.split(DATE_FIELD)]
    pattern = f"(?P<date>{_DATE_RE})".join(parts[:2])
    for part in parts[2:]:
        pattern += "(?P=date)" + part
    return re.compile(pattern)


def list_partitions(input_uri: str, storage_options: Mapping[str, Any] | None = None
                    ) -> list[str]:
    """The dates of the input partitions that exist, sorted, from one listing of the root.

    Raises ``FileNotFoundError`` when the root itself does not exist."""
    if DATE_FIELD in input_uri:
        root = root_of(input_uri)
        _check_root(root, storage_options)
        fs, path = filesystem(input_uri, storage_options)
        path = path.rstrip("/")
        matcher = _template_regex(path)
        fs.invalidate_cache()  # a long-lived process must see what arrived since last time
        found = retry(lambda: fs.glob(path.replace(DATE_FIELD, "*")), input_uri, "listing")
        days = {m.group("date") for p in found if (m := matcher.fullmatch(p.rstrip("/")))}
    else:
        fs, path = filesystem(input_uri, storage_options)
        fs.invalidate_cache()
        try:
            children = retry(lambda: fs.ls(path.rstrip("/") or path, detail=True), input_uri,
                             "listing")
        except FileNotFoundError:
            raise FileNotFoundError(_root_missing(input_uri)) from None
        days = {m.group(1) for c in children if c.get("type") == "directory"
                and (m := _PARTITION_RE.fullmatch(posixpath.basename(c["name"].rstrip("/"))))}
    valid = []
    for day in sorted(days):
        try:
            valid.append(parse_date(day))
        except argparse.ArgumentTypeError:
            log.warning("ignoring partition with an invalid date: %s", day)
    return valid


def _root_missing(root: str) -> str:
    return (f"input root not found: {root} (check the path, bucket and endpoint; a missing "
            f"partition of one date is fine, a missing root is not)")


def _check_root(root: str, storage_options: Mapping[str, Any] | None) -> None:
    fs, path = filesystem(root, storage_options)
    fs.invalidate_cache()
    if not retry(lambda: fs.exists(path), root, "listing"):
        raise FileNotFoundError(_root_missing(root))


def partition_files(uri: str, storage_options: Mapping[str, Any] | None = None
                    ) -> list[str] | None:
    """The files of a partition (hidden ``.x`` and ``_x`` names left out), or None when the
    partition does not exist."""
    fs, path = filesystem(uri, storage_options)
    path = path.rstrip("/") or path
    fs.invalidate_cache()
    if any(ch in path for ch in "*?["):
        found = [p for p, info in retry(lambda: fs.glob(path, detail=True), uri,
                                        "listing").items() if info.get("type") != "directory"]
        exists = bool(found)
    else:
        try:
            found = retry(lambda: fs.find(path), uri, "listing")
        except FileNotFoundError:
            return None
        exists = bool(found) or retry(lambda: fs.exists(path), uri, "listing")
    if not exists:
        return None
    return [p for p in found if not posixpath.basename(p.rstrip("/")).startswith((".", "_"))]


def first_night(date_: str, since: str | None, lookback_days: int = 0) -> str | None:
    """The first night a run covers besides ``date_``: ``since`` when given, else the night
    ``lookback_days`` before ``date_`` (None for ``date_`` alone)."""
    if lookback_days < 0:
        raise BadInput(f"--lookback-days must be >= 0, got {lookback_days}")
    if since is not None or lookback_days == 0:
        return since
    return (date.fromisoformat(date_) - timedelta(days=lookback_days)).isoformat()


@dataclass(frozen=True)
class Nights:
    """What a nightly run covers: the roots (or ``{date}`` templates) of the input and output
    partitions, the night ``date`` and, with ``since``, every existing partition from then on."""

    input: str
    output: str
    date: str
    since: str | None = None


def select_dates(args: Nights, storage_options: Mapping[str, Any] | None = None
                 ) -> list[str]:
    """The dates this run covers: ``--date`` alone, or the existing partitions from ``--since``
    to ``--date`` plus ``--date`` itself (so a night without input is always recorded)."""
    if args.since is None:
        _check_root(root_of(args.input), storage_options)
        return [args.date]
    existing = list_partitions(args.input, storage_options)
    days = [d for d in existing if args.since <= d <= args.date]
    log.info("%d input partition(s) from %s to %s under %s", len(days), args.since, args.date,
             root_of(args.input))
    return sorted(set(days) | {args.date})


# ---------------------------------------------------------------------------------------------
# The ledger


def ledger_dir(output: str) -> str:
    return f"{root_of(output).rstrip('/')}/{LEDGER_DIR}"


def read_ledger(output: str, storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """Every run record under ``output``'s ledger (one listing, one batched read), oldest first.
    ``output`` is the nightly ``--output`` (a root or a ``{date}`` template)."""
    uri = ledger_dir(output)
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache()
    try:
        names = [p for p in retry(lambda: fs.ls(path, detail=False), uri, "listing")
                 if p.endswith(".json") and not posixpath.basename(p).startswith(".")]
    except FileNotFoundError:
        return []
    if not names:
        return []
    raw = retry(lambda: fs.cat(names), uri, "reading the ledger")
    records = []
    for name in names:
        try:
            record = json.loads(raw[name])
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (KeyError, ValueError) as exc:
            log.warning("unreadable ledger record %s: %s", name, exc)
            continue
        records.append(record)
    return sorted(records, key=lambda r: (str(r.get("started", "")), str(r.get("run_id", ""))))


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    # Milliseconds: records are ordered by this, and two runs may start within one second.
    return moment.isoformat(timespec="milliseconds")


class Ledger:
    """This run's record; ``save()`` rewrites it whole."""

    def __init__(self, output: str, config: dict[str, Any], dates: dict[str, Any],
                 storage_options: Mapping[str, Any] | None = None):
        started = _now()
        self.run_id = f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        self.uri = f"{ledger_dir(output)}/{self.run_id}.json"
        self.storage_options = storage_options
        self.t0 = time.time()
        self.record: dict[str, Any] = {
            "ledger_version": LEDGER_VERSION,
            "run_id": self.run_id,
            "status": "running",
            "exit_code": None,
            "started": _iso(started),
            "finished": None,
            "seconds": None,
            "host": socket.gethostname(),
            "model_version": None,
            "selection": dates,
            "dates": [],
            "totals": {},
            "config": config,
        }

    def add(self, entry: dict[str, Any]) -> None:
        self.record["dates"].append(entry)
        if entry.get("model_version") and not self.record["model_version"]:
            self.record["model_version"] = entry["model_version"]
        self.record["totals"] = _totals(self.record["dates"])

    def finish(self, status: str, exit_code: int | None, error: str | None = None) -> None:
        self.record.update(status=status, exit_code=exit_code, finished=_iso(_now()),
                           seconds=round(time.time() - self.t0, 3))
        if error:
            self.record["error"] = error
        self.record["totals"] = _totals(self.record["dates"])

    def save(self) -> None:
        write_bytes(self.uri, json.dumps(redact_values(self.record), indent=2).encode(),
                    self.storage_options)


def _totals(entries: list[dict]) -> dict[str, Any]:
    keys = ("shards_found", "shards_processed", "shards_skipped", "samples", "errors")
    totals = {k: sum(e.get(k) or 0 for e in entries) for k in keys}
    totals["dates"] = len(entries)
    # What the nights cost: GPU- and CPU-seconds (and money) in all and per million rows.
    costs = [e["cost"] for e in entries if e.get("cost")]
    prices = {c["gpu_hour_price"] for c in costs if "gpu_hour_price" in c}
    totals["cost"] = cost_figures(sum(c["rows"] for c in costs),
                                  sum(c["gpu_s"] for c in costs), sum(c["cpu_s"] for c in costs),
                                  prices.pop() if len(prices) == 1 else None)
    for status in ("ok", "failed", "no_input", "error"):
        totals[f"dates_{status}"] = sum(e.get("status") == status for e in entries)
    return totals


def _shard_names(files: list[str]) -> list[str]:
    """The shards behind output files (a big shard's later pieces name it once)."""
    names = set()
    for uri in files:
        base = posixpath.basename(uri)
        names.add(shard_of(stem_of(base) or base))
    return sorted(names)


def _report_previous(records: list[dict], ledger_uri: str) -> None:
    if not records:
        log.info("ledger %s: no earlier runs", ledger_uri)
        return
    last = records[-1]
    totals = last.get("totals") or {}
    log.info("previous run %s (started %s on %s): %s, dates %s, %s shard(s) processed, "
             "%s skipped", last.get("run_id"), last.get("started"), last.get("host"),
             last.get("status"), _dates_text(last), totals.get("shards_processed", 0),
             totals.get("shards_skipped", 0))
    if last.get("status") == "running":
        log.warning("previous run %s (started %s on %s) did not finish: it was killed, or it "
                    "is still going and both runs work on the same output; the shards it did "
                    "not commit are done by the next run that covers their dates",
                    last.get("run_id"), last.get("started"), last.get("host"))
    elif last.get("status") in ("error", "failed", "interrupted"):
        log.warning("previous run %s ended with status %s%s", last.get("run_id"),
                    last.get("status"), f": {last['error']}" if last.get("error") else "")


# ---------------------------------------------------------------------------------------------
# The nightly command


def run_nights(args: Nights, base: InferConfig, outcome=None) -> int:
    """Run the selected dates of ``args`` with the inference settings ``base``, recording the
    run in the output's ledger (and its totals in ``outcome``, a ``pushgateway.RunOutcome``,
    when given, however the run ends)."""
    selection = {"date": args.date, "since": args.since, "input": args.input,
                 "output": args.output}
    print(f"nightly: {'dates ' + args.since + ' to ' if args.since else 'date '}{args.date}, "
          f"{args.input} -> {args.output}", flush=True)

    _report_previous(read_ledger(args.output, base.storage_options), ledger_dir(args.output))
    ledger = Ledger(args.output, base.public_dict(), selection, base.storage_options)
    ledger.save()
    log.info("ledger record: %s", ledger.uri)
    try:
        code = _run_dates(args, base, ledger)
    except BaseException as exc:  # record why the run stopped, then let it propagate
        _fill_outcome(outcome, ledger)
        code = (exc.exit_code if isinstance(exc, PipelineError)
                else 2 if isinstance(exc, (FileNotFoundError, PermissionError)) else None)
        status = "error" if isinstance(exc, Exception) else "interrupted"
        ledger.finish(status, code, f"{type(exc).__name__}: {exc}")
        try:
            ledger.save()
        except Exception:  # keep the original error; this one is only logged
            log.exception("could not update the ledger record %s", ledger.uri)
        raise
    _fill_outcome(outcome, ledger)
    print(_final_line(ledger), flush=True)
    return code


def _fill_outcome(outcome, ledger: Ledger) -> None:
    if outcome is None:
        return
    entries = ledger.record["dates"]
    outcome.rows = sum(e.get("samples") or 0 for e in entries)
    outcome.errors = sum(e.get("errors") or 0 for e in entries)
    outcome.errors_by_kind = errors_by_kind(entries)


def _run_dates(args: Nights, base: InferConfig, ledger: Ledger) -> int:
    from pipeline.inference.job import run_inference

    days = select_dates(args, base.storage_options)
    code = 0
    for i, day in enumerate(days, 1):
        partition_in, partition_out = partition_uri(args.input, day), partition_uri(args.output,
                                                                                    day)
        entry: dict[str, Any] = {"date": day, "input": partition_in, "output": partition_out}
        t0 = time.time()
        files = partition_files(partition_in, base.storage_options)
        if not files:
            why = "does not exist" if files is None else "is empty"
            log.warning("date %s (%d/%d): input partition %s %s: nothing to do", day, i,
                        len(days), partition_in, why)
            entry.update(status="no_input", message=f"input partition {why}", shards_found=0,
                         shards_processed=0, shards_skipped=0, samples=0, errors=0)
            print(f"date {day}: no input ({partition_in} {why})", flush=True)
        else:
            log.info("date %s (%d/%d): %s -> %s (%d file(s))", day, i, len(days), partition_in,
                     partition_out, len(files))
            try:
                summary = run_inference(replace(base, input=partition_in, output=partition_out))
            except Exception as exc:
                # One bad partition must not stop the other dates, nor every later night.
                # A PipelineError says what to do (its exit status: 2 bad input, 1 failed);
                # anything else is a bug, logged with its traceback.
                said = isinstance(exc, (PipelineError, FileNotFoundError, PermissionError))
                log.error("date %s: %s: %s", day, type(exc).__name__, exc, exc_info=not said)
                print(f"date {day}: error: {exc}", file=sys.stderr, flush=True)
                entry.update(status="error", message=f"{type(exc).__name__}: {exc}",
                             seconds=round(time.time() - t0, 3))
                code = max(code, exc.exit_code if isinstance(exc, PipelineError)
                           else 2 if said else 1)
            else:
                entry.update(_summary_entry(summary))
                print(f"date {day}: {redact(summary.line())}", flush=True)
                if summary.failed:
                    code = max(code, 1)
        entry.setdefault("seconds", round(time.time() - t0, 3))
        ledger.add(entry)
        ledger.save()
    statuses = {e["status"] for e in ledger.record["dates"]}
    status = ("error" if "error" in statuses else "failed" if "failed" in statuses
              else "ok" if "ok" in statuses else "no_input")
    ledger.finish(status, code)
    ledger.save()
    return code


def _summary_entry(summary) -> dict[str, Any]:
    return {
        "status": "failed" if summary.failed else "ok",
        "model_version": summary.model_version,
        "shards_found": summary.shards,
        "shards_processed": summary.shards - summary.skipped_shards,
        "shards_skipped": summary.skipped_shards,
        "samples": summary.samples,
        "samples_skipped": summary.skipped_rows,
        "errors": summary.errors,
        "errors_by_kind": dict(summary.errors_by_kind),
        "failed_shards": list(summary.failed_shards),
        "seconds": round(summary.seconds, 3),
        "images_per_s": round(summary.images_per_s, 3),
        "rows": summary.rows,
        "cost": summary.cost,
        "report": summary.report,
        "processed": _shard_names(summary.files),
    }


def _final_line(ledger: Ledger) -> str:
    r, t = ledger.record, ledger.record["totals"]
    counts = ", ".join(f"{t[f'dates_{s}']} {s}" for s in ("ok", "failed", "no_input", "error")
                       if t[f"dates_{s}"])
    return (f"nightly: {t['dates']} date(s) ({counts or 'none'}): {t['shards_processed']} "
            f"shard(s) processed, {t['shards_skipped']} already done, {t['samples']} samples, "
            f"{t['errors']} errors, {r['seconds']:.1f} s; ledger {ledger.uri} "
            f"[{r['status'].upper()}]")


# ---------------------------------------------------------------------------------------------
# The ledger command


def _dates_text(record: dict) -> str:
    days = [e.get("date") for e in record.get("dates") or []]
    if not days:
        sel = record.get("selection") or {}
        days = [d for d in (sel.get("since"), sel.get("date")) if d]
    if not days:
        return "-"
    return days[0] if len(days) == 1 else f"{days[0]}..{days[-1]} ({len(days)})"


def ledger_table(records: list[dict]) -> str:
    header = ("started", "run", "dates", "status", "processed", "skipped", "samples", "errors",
              "seconds", "GPU-s/M rows", "CPU-s/M rows")
    rows = [header]

    def per_million(cost: dict, key: str) -> str:
        value = cost.get(f"{key}_per_million_rows")
        return "-" if value is None else f"{value:,.1f}"

    for r in records:
        t = r.get("totals") or {}
        cost = t.get("cost") or {}
        seconds = r.get("seconds")
        rows.append((str(r.get("started", "")), str(r.get("run_id", "")).rsplit("-", 1)[-1],
                     _dates_text(r), str(r.get("status", "")),
                     str(t.get("shards_processed", 0)), str(t.get("shards_skipped", 0)),
                     str(t.get("samples", 0)), str(t.get("errors", 0)),
                     "-" if seconds is None else f"{seconds:.1f}",
                     per_million(cost, "gpu_s"), per_million(cost, "cpu_s")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
                     for row in rows)
