"""The run report: ``OUTPUT/_report/<run id>.html``, one self-contained page per run.

Built from what the run left behind, never from the driver's memory, so that ``landmarks
report OUTPUT [--run ID]`` rebuilds the same page later: the run's manifest (counts, stage
seconds, retries, cost, config), its receipts (when each file was committed, from which shard,
with which errors), a bounded sample of its Parquet files (error examples, faces per image)
and a few input images with their landmarks drawn (the preview).

Its cost stays bounded however large the run: receipts are read one part at a time and folded
into per-shard spans and a timeline of fixed size; at most ``SAMPLE_FILES`` output files are
opened, reading only the columns needed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.report import MANIFEST_DIR, read_manifest
from pipeline.io.rows import NO_FACE
from pipeline.io.storage import filesystem, read_bytes, redact, write_bytes
from pipeline.report import page, svg

log = logging.getLogger("pipeline")

REPORT_DIR = "_report"
TIMELINE_BINS = 60
SLOWEST_SHARDS = 10
EXAMPLES_PER_KIND = 3
SAMPLE_FILES = 50  # output files opened for error examples and faces per image (each)
PREVIEW_IMAGES = 8
PREVIEW_TILE, PREVIEW_COLOURS = 240, 128  # ~100-200 KB of PNG in the page


def report_uri(output: str, run_id: str) -> str:
    return f"{output.rstrip('/')}/{REPORT_DIR}/{run_id}.html"


def run_ids(output: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The runs with a manifest under ``output``, oldest first (run ids sort by time)."""
    fs, path = filesystem(f"{output.rstrip('/')}/{MANIFEST_DIR}", storage_options)
    try:  # one listing: the runs' folders and the manifests in them
        names = fs.find(path, maxdepth=2)
    except FileNotFoundError:
        return []
    return sorted(n.rstrip("/").rsplit("/", 2)[-2] for n in names
                  if n.endswith("/manifest.json"))


def iter_receipts(output: str, manifest: Mapping[str, Any],
                  storage_options: Mapping[str, Any] | None = None) -> Iterator[dict]:
    root = output.rstrip("/")
    for part in manifest["receipts"]:
        for line in read_bytes(f"{root}/{part}", storage_options).decode().splitlines():
            if line:
                yield json.loads(line)


@dataclass
class ShardSpan:
    started: float = math.inf
    ended: float = 0.0
    rows: int = 0
    files: int = 0


@dataclass
class RunFigures:
    """What the receipts say, folded: bounded by shards and ``TIMELINE_BINS``."""

    t0: float
    seconds: float
    timeline: list[int] = field(default_factory=lambda: [0] * TIMELINE_BINS)
    shards: dict[str, ShardSpan] = field(default_factory=dict)
    error_files: list[tuple[str, str]] = field(default_factory=list)  # (file, shard)
    face_files: list[str] = field(default_factory=list)
    timed: int = 0  # receipts with a commit time (older runs' have none)

    @property
    def bin_s(self) -> float:
        return max(self.seconds, 1e-9) / TIMELINE_BINS

    def add(self, receipt: Mapping[str, Any], searched: bool) -> None:
        span = self.shards.setdefault(receipt["shard"], ShardSpan())
        span.rows += receipt["rows"]
        span.files += 1
        at = receipt.get("at")
        if at is not None:
            self.timed += 1
            span.ended = max(span.ended, at)
            span.started = min(span.started, receipt.get("started", at))
            i = min(TIMELINE_BINS - 1, max(0, int((at - self.t0) / self.bin_s)))
            self.timeline[i] += receipt["rows"]
        if receipt["errors"] and len(self.error_files) < SAMPLE_FILES:
            self.error_files.append((receipt["file"], receipt["shard"]))
        if searched and len(self.face_files) < SAMPLE_FILES:
            self.face_files.append(receipt["file"])


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def fold_receipts(output: str, manifest: Mapping[str, Any],
                  storage_options: Mapping[str, Any] | None = None) -> RunFigures:
    t0 = _epoch(manifest["started"])
    figures = RunFigures(t0, max(_epoch(manifest["finished"]) - t0, manifest["seconds"], 1.0))
    for receipt in iter_receipts(output, manifest, storage_options):
        figures.add(receipt, bool(receipt.get("faces") or receipt.get("no_face")))
    return figures


def _read(uri: str, columns: list[str], storage_options) -> pa.Table:
    """Only ``columns`` of a part file: the footer and those column chunks (ranged reads on
    an object store), not the landmarks and metadata that make up most of its bytes."""
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = set(parquet.schema_arrow.names)  # an older file may lack a newer column
        return parquet.read(columns=[c for c in columns if c in names])


def error_examples(output: str, files: list[tuple[str, str]], kinds: Mapping[str, int],
                   storage_options=None) -> dict[str, list[tuple[str, str, str]]]:
    """Up to ``EXAMPLES_PER_KIND`` ``(key, shard, message)`` of each error kind, from the
    files whose receipts counted errors (stops once every kind has its examples)."""
    examples: dict[str, list[tuple[str, str, str]]] = {k: [] for k in kinds}
    for name, shard in files:
        if all(len(v) >= EXAMPLES_PER_KIND for v in examples.values()):
            break
        table = _read(f"{output.rstrip('/')}/{name}", ["key", "error", "error_kind"],
                      storage_options)
        for row in table.filter(pc.is_valid(table["error_kind"])).to_pylist():
            kind = row["error_kind"]
            if kind in examples and len(examples[kind]) < EXAMPLES_PER_KIND:
                examples[kind].append((row["key"] or "(no key)", shard, row["error"] or ""))
    return examples


def faces_per_image(output: str, files: list[str], storage_options=None) -> dict[int, int]:
    """Images by number of faces found, over ``files`` (images searched for faces)."""
    counts: dict[int, int] = {}
    for name in files:
        table = _read(f"{output.rstrip('/')}/{name}", ["key", "face_score", "error_kind",
                                                       "status"], storage_options)
        status = (table["status"].to_pylist() if "status" in table.column_names
                  else [None] * table.num_rows)  # files written before the status column
        per_key: dict[str, int] = {}
        for key, score, kind, state in zip(table["key"].to_pylist(),
                                           table["face_score"].to_pylist(),
                                           table["error_kind"].to_pylist(), status, strict=True):
            if NO_FACE in (state, kind):
                per_key.setdefault(key, 0)
            elif score is not None and math.isfinite(score):
                per_key[key] = per_key.get(key, 0) + 1
        for n in per_key.values():
            counts[n] = counts.get(n, 0) + 1
    return dict(sorted(counts.items()))


def preview_png(manifest: Mapping[str, Any], first_shard: str | None, shard=None,
                storage_options=None) -> tuple[bytes | None, str]:
    """A few images of the run's first shard with their landmarks drawn, or why not."""
    from pipeline.io.shards import DEFAULT_FILES_PER_SHARD, list_shards
    from pipeline.report.preview import render_preview

    config = manifest["config"]
    if shard is None:
        if first_shard is None:
            return None, "no file was committed in this run"
        try:
            listed = list_shards(config["input"], config.get("format", "auto"),
                                 storage_options,
                                 config.get("files_per_shard") or DEFAULT_FILES_PER_SHARD)
            shard = next((s for s in listed if s.name == first_shard), None)
        except (OSError, ValueError) as exc:
            return None, f"the input could not be listed ({exc})"
        if shard is None:
            return None, f"shard {first_shard} is no longer in the input"
    try:
        png, drawn = render_preview(shard, manifest["output"], PREVIEW_IMAGES,
                                    storage_options=storage_options, tile_size=PREVIEW_TILE,
                                    colours=PREVIEW_COLOURS)
    except (OSError, ValueError) as exc:
        return None, f"the preview could not be drawn ({exc})"
    return png, f"{drawn} images of shard {shard.name}"


def build_run_report(output: str, run_id: str | None = None,
                     storage_options: Mapping[str, Any] | None = None,
                     shards: Sequence | None = None) -> tuple[str, dict[str, Any]]:
    """The page of run ``run_id`` (default: the latest) and its manifest. ``shards``: the
    input's shards, to draw the preview from (the job passes them; else the input is listed
    again)."""
    manifest = read_manifest(output, run_id, storage_options)
    manifest = {**manifest, "output": redact(output.rstrip("/"))}
    figures = fold_receipts(output, manifest, storage_options)
    first = next(iter(figures.shards), None)
    shard = next((s for s in shards or () if s.name == first), None)
    png, preview_note = preview_png(manifest, first, shard, storage_options)
    examples = error_examples(output, figures.error_files, manifest["errors_by_kind"],
                              storage_options)
    searched = manifest.get("faces", 0) or manifest.get("no_face", 0)
    faces = faces_per_image(output, figures.face_files, storage_options) if searched else {}
    return render(manifest, figures, examples, faces, png, preview_note), manifest


def write_run_report(output: str, run_id: str | None = None,
                     storage_options: Mapping[str, Any] | None = None,
                     shards: Sequence | None = None) -> str:
    """Build the page and write it to ``OUTPUT/_report/<run id>.html``; returns that URI."""
    text, manifest = build_run_report(output, run_id, storage_options, shards)
    uri = report_uri(output, manifest["run_id"])
    write_bytes(uri, text.encode(), storage_options)
    return uri


# -- the page ------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    value = float(value)
    if value < 120:
        return f"{value:.1f} s"
    hours, rest = divmod(int(round(value)), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60} min {rest % 60:02d} s"


def render(m: Mapping[str, Any], f: RunFigures, examples, faces: Mapping[int, int],
           png: bytes | None, preview_note: str) -> str:
    status = m["status"]
    cost = m.get("cost") or {}
    stages = m.get("stages") or {}
    config = m.get("config") or {}
    e = page.esc
    out = [f'<h1>Landmarks run {e(m["run_id"])}<span class="badge '
           f'{"ok" if status == "ok" else "failed"}">{page.figure("status", status.upper())}'
           "</span></h1>",
           f'<p class="sub">{e(config.get("input", "?"))} &rarr; {e(m["output"])} &middot; '
           f'started {e(m["started"])}, finished {e(m["finished"])} &middot; model '
           f'{page.figure("model_version", m["model_version"])}</p>']

    items = [("samples", "images read this run", page.number(m["samples"])),
             ("rows", "rows written", page.number(m.get("rows", m["samples"]))),
             ("files", "files committed", page.number(m["files"])),
             ("errors", "error rows", page.number(m["errors"])),
             ("shards", "shards in the input", page.number(m["shards"])),
             ("shards_skipped", "shards done before", page.number(m["shards_skipped"])),
             ("seconds", "seconds", page.number(m["seconds"])),
             ("images_per_s", "images/s", page.number(m["images_per_s"])),
             ("busy_fraction", "predictor busy",
              f"{100 * m.get('predictor_busy_fraction', 0.0):.1f} %"),
             ("gpu_s_per_million_rows", "GPU-s per million rows",
              page.number(cost.get("gpu_s_per_million_rows"))),
             ("cpu_s_per_million_rows", "CPU-s per million rows",
              page.number(cost.get("cpu_s_per_million_rows")))]
    if "gpu_cost" in cost:
        items += [("gpu_cost", f"GPU cost at {cost['gpu_hour_price']:g} per GPU hour",
                   page.number(cost["gpu_cost"], 2)),
                  ("gpu_cost_per_million_rows", "GPU cost per million rows",
                   page.number(cost["gpu_cost_per_million_rows"], 2))]
    out.append(page.cards(items))
    if m["failed_shards"]:
        out.append(f'<p class="note">Shards stopped part-way (a rerun redoes them): '
                   f'{e(", ".join(m["failed_shards"][:20]))}</p>')
    elif status != "ok":
        limit = config.get("max_error_fraction")
        out.append(f'<p class="note">Failed: more than {e(limit)} of the samples are errors '
                   f'(this run: {m["errors"]} of {m["samples"]}).</p>')

    # Throughput over the run, and where the time went.
    out.append('<div class="grid2"><div><h2>Rows committed per second</h2>')
    if f.timed:
        xs = [(i + 0.5) * f.bin_s for i in range(TIMELINE_BINS)]
        ys = [n / f.bin_s for n in f.timeline]
        out.append(svg.line_chart([("rows/s", xs, ys)], x_label="seconds since the start",
                                  y_label="rows/s", name="throughput"))
        out.append(f'<p class="note">{TIMELINE_BINS} bins of {f.bin_s:.1f} s; a unit\'s rows '
                   "count when its file is committed.</p>")
    else:
        out.append('<p class="note">This run\'s receipts carry no commit times.</p>')
    out.append("</div><div><h2>Time by stage</h2>")
    wall = [("read", stages.get("read_s", 0.0)), ("predict", stages.get("predict_s", 0.0)),
            ("commit", stages.get("commit_s", 0.0))]
    cpu = [("read CPU", stages.get("read_cpu_s", 0.0)),
           ("predict CPU", stages.get("predict_cpu_s", 0.0)),
           ("commit CPU", stages.get("commit_cpu_s", 0.0))]
    out.append(svg.bars(wall + cpu, unit=" s", name="stages"))
    decode = m.get("device_decode") or {}
    by_reason = decode.get("cpu_fallbacks") or {}
    busy = page.figure("busy_s", page.number(stages.get("predict_busy_s", 0.0)))
    share = 100 * m.get("predictor_busy_fraction", 0.0)
    on_device = page.figure("device_decoded", page.number(decode.get("decoded_on_device", 0)))
    fallbacks = page.figure("cpu_fallbacks", page.number(sum(by_reason.values())))
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items()))
    out.append(f'<p class="note">Seconds summed over units (two predictor calls at once both '
               f"count). Predictors busy {busy} s of the time they were held ({share:.1f} %). "
               f"Decoded on the device: {on_device}, CPU fallbacks: {fallbacks}"
               f'{f" ({e(reasons)})" if reasons else ""}.</p>')
    out.append("</div></div>")

    # Errors and faces.
    out.append('<div class="grid2"><div><h2>Errors by kind</h2>')
    kinds = m["errors_by_kind"]
    if kinds:
        rows = []
        for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
            shown = "<br>".join(f"<code>{e(key)}</code> in {e(shard)}: {e(msg[:200])}"
                                for key, shard, msg in examples.get(kind, []))
            rows.append((e(kind), page.figure(f"errors.{kind}", page.number(n)), shown))
        out.append(page.table(["kind", "rows", "examples (key in shard: message)"], rows,
                              numeric=[1], raw=[0, 1, 2]))
    else:
        out.append(f'<p>{page.figure("errors_none", "No error rows")} in this run.</p>')
    out.append("</div><div><h2>Faces</h2>")
    if faces or m.get("faces") or m.get("no_face"):
        out.append(f'<p>{page.figure("faces", page.number(m.get("faces", 0)))} faces found; '
                   f'{page.figure("no_face", page.number(m.get("no_face", 0)))} '
                   f'image{"" if m.get("no_face") == 1 else "s"} searched without a face (not '
                   "errors).</p>")
        if faces:
            out.append(svg.bars([(f"{n} face{'s' if n != 1 else ''}", float(c))
                                 for n, c in faces.items()], digits=0, name="faces"))
            out.append(f'<p class="note">Images by faces found, over the first '
                       f"{len(f.face_files)} files of the run searched for faces.</p>")
    else:
        out.append('<p class="note">No face search in this run: every image was cropped at '
                   "its sidecar box or centred square (--detect).</p>")
    out.append("</div></div>")

    # Slowest shards and retries.
    out.append('<div class="grid2"><div><h2>Slowest shards</h2>')
    spans = sorted(((name, s) for name, s in f.shards.items() if s.ended),
                   key=lambda kv: kv[1].started - kv[1].ended)[:SLOWEST_SHARDS]
    if spans:
        out.append(page.table(
            ["shard", "seconds (first read to last commit)", "rows", "files"],
            [(name, f"{s.ended - s.started:.1f}", page.number(s.rows), page.number(s.files))
             for name, s in spans], numeric=[1, 2, 3], sortable=True))
    else:
        out.append('<p class="note">No shard was timed in this run.</p>')
    out.append("</div><div><h2>Retries and restarts</h2>")
    retries = m.get("retries") or {}
    placement = m.get("placement") or {}
    labels = {"read": "read tasks run again", "predict": "predictor calls run again",
              "commit": "commits run again", "predictor_restarts": "predictor actors restarted",
              "agent_restarts": "node agents restarted", "leases_lost": "leases lost with "
              "their node agent"}
    rows = [(labels[k], page.figure(f"retries.{k}", page.number(retries.get(k, 0))))
            for k in labels]
    rows.append(("leases started twice near the end",
                 page.figure("leases_speculated",
                             page.number(placement.get("leases_speculated", 0)))))
    out.append(page.table(["what", "count"], rows, numeric=[1], raw=[1]))
    out.append("</div></div>")

    # The preview, then the model and config.
    out.append("<h2>Sample faces</h2>")
    if png:
        out.append(page.png_img(png, "sample faces with their landmarks drawn"))
        out.append(f'<p class="note">{e(preview_note)}: predicted landmarks red, model crop '
                   "blue, detected face yellow, labelled landmarks green.</p>")
    else:
        out.append(f'<p class="note">No preview: {e(preview_note)}.</p>')
    out.append("<h2>Model and settings</h2>")
    out.append(page.table(["setting", "value"],
                          [(k, json.dumps(v) if not isinstance(v, str) else v)
                           for k, v in sorted(config.items())], sortable=True))
    out.append(f'<p class="note">Manifest: {e(m["output"])}/_manifest/{e(m["run_id"])}/'
               f"manifest.json; rebuild this page with <code>landmarks report "
               f'{e(m["output"])} --run {e(m["run_id"])}</code>.</p>')
    return page.document(f"Landmarks run {m['run_id']} ({status})", "".join(out))
