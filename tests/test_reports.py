"""The run report and the evaluation page, built from files written here (no Ray, no model) and
looked at in a real headless browser: the figures it shows are the manifest's, nothing on it
fails or is fetched from elsewhere, and what an archive puts in keys cannot inject markup."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.browser import CHROMIUM, load_page

from pipeline.backend.executor import RunStats
from pipeline.io.report import ManifestWriter, Summary, run_figures, write_manifest
from pipeline.report.run import TIMELINE_BINS, build_run_report, fold_receipts, write_run_report

needs_browser = pytest.mark.skipif(CHROMIUM is None, reason=(
    "chromium is not installed (Debian package chromium; .ci/run installs it)"))
INJECTED = "<script>alert(1)</script>"


def _file(output, name, rows):
    """A part file with the columns the report reads."""
    pq.write_table(pa.table({
        "key": pa.array([r[0] for r in rows], pa.string()),
        "error": pa.array([r[1] for r in rows], pa.string()),
        "error_kind": pa.array([r[2] for r in rows], pa.string()),
        "face_score": pa.array([r[3] for r in rows], pa.float32())}), output / name)


def _receipt(name, shard, rows, errors, t0, started, at, **extra):
    return {"file": name, "shard": shard, "piece": 0, "last": True, "rows": rows,
            "images": extra.pop("images", rows), "faces": extra.pop("faces", 0),
            "no_face": extra.pop("no_face", 0), "errors": sum(errors.values()),
            "errors_by_kind": errors, "shard_failed": False, "bytes": 1000, "seconds": 0.5,
            "cpu_s": 0.25, "started": t0 + started, "at": t0 + at, "attempt": extra.pop(
                "attempt", 0)}


@pytest.fixture
def run_output(tmp_path):
    """A run of two shards, as the job leaves it: files, receipts and the manifest.

    Shard ``a`` (cropped at sidecar boxes): 2 good rows and 4 ``decode`` errors, one of them
    with a key that is markup. Shard ``b`` (searched for faces): an image with 2 faces, one with
    1, one without a face, and a ``too_large`` error. Predictors: one GPU held 60 s, busy 30."""
    output = tmp_path / "out"
    output.mkdir()
    _file(output, "part-a.parquet", [("a-0", None, None, None), ("a-1", None, None, None),
                                     ("a-2", "cannot decode image", "decode", None),
                                     (INJECTED, "cannot decode image <b>", "decode", None),
                                     ("a-4", "cannot decode image", "decode", None),
                                     ("a-5", "cannot decode image", "decode", None)])
    _file(output, "part-b.parquet", [("b-0", None, None, 0.99), ("b-0", None, None, 0.95),
                                     ("b-1", None, None, 0.97),
                                     ("b-2", "no face found", "no_face", None),
                                     ("b-3", "image too large", "too_large", None)])
    t0 = float(int(time.time()) - 30)
    start = datetime.fromtimestamp(t0, timezone.utc).isoformat(timespec="seconds")
    summary = Summary(3, 0, 0, 30.0, "v1", str(output), [], skipped_shards=1, skipped_rows=7)
    writer = ManifestWriter(str(output), "20261204T000000Z-abcdef")
    for receipt in (_receipt("part-a.parquet", "a", 6, {"decode": 4}, t0, 1.0, 5.2),
                    _receipt("part-b.parquet", "b", 5, {"too_large": 1}, t0, 2.0, 20.1,
                             images=4, faces=3, no_face=1, attempt=1)):
        summary.add(receipt)
        writer.add(receipt)
    stats = RunStats(read_s=3.0, read_cpu_s=2.0, predict_s=31.0, read_retries=2)
    stats.add_predictor({"id": "actor:1", "started_at": t0, "gpus": 1.0, "busy_s": 30.0,
                         "cpu_s": 6.0, "restarted": True})
    summary.placement = {"leases_lost": 1, "agent_restarts": 0}
    run_figures(summary, stats, t0 + 60, gpu_hour_price=2.5)
    write_manifest({"input": str(tmp_path / "gone"), "format": "auto",
                    "max_error_fraction": 0.01}, summary, writer, start)
    return output, t0


def test_the_manifest_gives_stage_seconds_retries_and_cost(run_output):
    output, _ = run_output
    m = json.loads((output / "_manifest.json").read_text())
    assert m == json.loads((output / "_manifest/20261204T000000Z-abcdef/manifest.json")
                           .read_text())  # every run's manifest stays beside its parts
    assert m["rows"] == 11 and m["samples"] == 10 and m["errors"] == 5
    assert m["stages"] == {"read_s": 3.0, "read_cpu_s": 2.0, "predict_s": 31.0,
                           "predict_busy_s": 30.0, "predict_cpu_s": 6.0, "commit_s": 1.0,
                           "commit_cpu_s": 0.5}
    assert m["predictor_busy_fraction"] == 0.5
    assert m["retries"] == {"read": 2, "predict": 0, "commit": 1, "predictor_restarts": 1,
                            "agent_restarts": 0, "leases_lost": 1}
    cost = m["cost"]
    assert cost["gpu_s"] == 60.0 and cost["cpu_s"] == 8.5  # read 2 + predict 6 + commit 0.5
    assert cost["gpu_s_per_million_rows"] == pytest.approx(60.0 * 1e6 / 11, abs=1e-3)
    assert cost["cpu_s_per_million_rows"] == pytest.approx(8.5 * 1e6 / 11, abs=1e-3)
    assert cost["gpu_cost"] == pytest.approx(60 / 3600 * 2.5, abs=1e-4)
    assert cost["gpu_cost_per_million_rows"] == pytest.approx(60 / 3600 * 2.5 * 1e6 / 11,
                                                              abs=1e-3)


def test_receipts_fold_into_a_timeline_and_shard_spans(run_output):
    output, t0 = run_output
    m = json.loads((output / "_manifest.json").read_text())
    f = fold_receipts(str(output), m)
    assert sum(f.timeline) == 11 and len(f.timeline) == TIMELINE_BINS
    assert f.timeline[int(5.2 / f.bin_s)] == 6 and f.timeline[int(20.1 / f.bin_s)] == 5
    assert f.shards["b"].ended - f.shards["b"].started == pytest.approx(18.1)
    assert f.shards["a"].ended - f.shards["a"].started == pytest.approx(4.2)
    assert f.face_files == ["part-b.parquet"]  # only b was searched for faces
    assert f.error_files == [("part-a.parquet", "a"), ("part-b.parquet", "b")]


@needs_browser
def test_the_run_report_shows_the_manifest_s_figures_in_a_browser(run_output):
    output, _ = run_output
    uri = write_run_report(str(output))
    assert uri == f"{output}/_report/20261204T000000Z-abcdef.html"
    text = (output / "_report/20261204T000000Z-abcdef.html").read_text()
    assert INJECTED not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "No preview: the input could not be listed" in text  # the input is gone: said

    # Sort the slowest-shards table by its seconds column, twice (descending, ascending).
    page = load_page(uri, evaluate="""(() => {
        const t = document.querySelector("table.sortable"), th = t.querySelectorAll("th")[1];
        const order = () => [...t.tBodies[0].rows].map(r => r.cells[0].textContent);
        const shown = order(); th.click(); const down = order(); th.click();
        return {shown, down, up: order(),
                charts: [...document.querySelectorAll("svg[data-chart]")]
                  .map(s => s.dataset.chart)};
    })()""")
    assert page.errors == []
    assert all(r == f"file://{uri}" or r.startswith("data:") for r in page.requests), \
        page.requests  # nothing fetched from anywhere else
    m = json.loads((output / "_manifest.json").read_text())
    f = page.figures
    assert f["status"] == m["status"].upper() == "FAILED"  # 5 errors in 17 rows > 1 %
    for name in ("samples", "rows", "files", "errors", "shards", "shards_skipped", "no_face",
                 "faces"):
        assert int(f[name].replace(",", "")) == m[name], name
    assert {k: int(f[f"errors.{k}"]) for k in m["errors_by_kind"]} == {"decode": 4,
                                                                        "too_large": 1}
    assert f["busy_fraction"] == "50.0 %"
    assert float(f["gpu_s_per_million_rows"].replace(",", "")) == pytest.approx(
        m["cost"]["gpu_s_per_million_rows"], abs=0.05)
    assert float(f["gpu_cost"]) == pytest.approx(m["cost"]["gpu_cost"], abs=0.005)
    assert {k: int(f[f"retries.{k}"]) for k in m["retries"]} == m["retries"]
    assert page.value["shown"] == ["b", "a"] and page.value["down"] == ["b", "a"]
    assert page.value["up"] == ["a", "b"]
    assert page.value["charts"] == ["throughput", "stages", "faces"]


def test_error_examples_and_faces_per_image_come_from_the_files(run_output):
    output, _ = run_output
    text, m = build_run_report(str(output))
    assert "Failed: more than 0.01 of the samples are errors (this run: 5 of 10)" in text
    # Three examples of the four decode errors, with the shard they came from; one too_large.
    assert text.count("cannot decode image") == 3 and "cannot decode image &lt;b&gt;" in text
    assert "<code>b-3</code> in b: image too large" in text
    # Faces per image over shard b: one image with 0, 1 and 2 faces each.
    assert '<title>0 faces: 1</title>' in text and '<title>1 face: 1</title>' in text
    assert '<title>2 faces: 1</title>' in text


@needs_browser
def test_the_evaluation_page_shows_the_json_report_s_figures(tmp_path):
    from pipeline.demo.synthetic import write_sample_archive
    from pipeline.evaluation.config import EvalConfig
    from pipeline.evaluation.evaluate import main as evaluate
    from pipeline.io.shards import list_shards, read_samples

    labels = tmp_path / "labels"
    write_sample_archive(str(labels), num_shards=1, samples_per_shard=4, seed=1,
                         image_size=(96, 96))
    rows = []  # predictions 2 px right of every label, as the inference job writes them
    for shard in list_shards(str(labels)):
        for sample in read_samples(shard):
            points = np.asarray(sample.meta["landmarks"]) + (2.0, 0.0)
            rows.append({"key": sample.key, "landmarks": points.tolist(), "error": None,
                         "model_version": "v"})
    (tmp_path / "pred").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pred" / "part-x.parquet")
    report = evaluate(EvalConfig(labels=str(labels), predictions=str(tmp_path / "pred"),
                                 report=str(tmp_path / "eval.json")))
    assert report["report_html"] == str(tmp_path / "eval.html")

    page = load_page(tmp_path / "eval.html", evaluate="""(() => {
        const ced = document.querySelector("svg[data-chart=ced] polyline");
        return {points: ced.getAttribute("points").split(" ").length,
                regions: document.querySelectorAll("svg[data-chart=regions] rect").length};
    })()""")
    assert page.errors == []
    f = page.figures
    assert int(f["samples"]) == report["samples"] == 4
    assert f["nme"] == f"{100 * report['nme']:.2f} %"
    t = report["threshold"]
    assert f["failure_rate"] == f"{100 * report[f'failure_rate@{t:g}']:.2f} %"
    assert f["auc"] == f"{report[f'auc@{t:g}']:.3f}"
    assert f["model_version"] == "v"
    assert page.value["regions"] == len(report["nme_by_region"]) == 5
    assert page.value["points"] > 100  # the CED as stairs over the threshold's range


def test_the_ledger_totals_what_the_nights_cost():
    from pipeline.ops.nightly import _totals

    entries = [{"status": "ok", "samples": 10, "cost": {"rows": 1000, "gpu_s": 2.0,
                                                         "cpu_s": 10.0, "gpu_hour_price": 3.0}},
               {"status": "ok", "samples": 30, "cost": {"rows": 3000, "gpu_s": 6.0,
                                                         "cpu_s": 30.0, "gpu_hour_price": 3.0}},
               {"status": "no_input"}]
    cost = _totals(entries)["cost"]
    assert cost["rows"] == 4000 and cost["gpu_s"] == 8.0 and cost["cpu_s"] == 40.0
    assert cost["gpu_s_per_million_rows"] == 2000.0 and cost["cpu_s_per_million_rows"] == 1e4
    assert cost["gpu_cost"] == pytest.approx(8 / 3600 * 3.0, abs=1e-4)
