"""The evaluation report as a page: ``landmarks evaluate`` writes it beside its JSON report.

The figures of the JSON (NME, failure rate, AUC, per-region NME, the worst samples) and the
cumulative error distribution (CED) drawn as inline SVG, in one self-contained file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.report import page, svg


def report_page_uri(json_uri: str) -> str:
    """``report.json`` -> ``report.html`` (beside it, as the CED PNG is)."""
    return (json_uri[: -len(".json")] if json_uri.endswith(".json") else json_uri) + ".html"


def _percent(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f} %"


def render_evaluation(report: Mapping[str, Any], errors: Sequence[float],
                      fractions: Sequence[float]) -> str:
    """The page of an evaluation ``report`` and its CED curve (``metrics.ced_curve``)."""
    t = report["threshold"]
    e = page.esc
    out = [f"<h1>Landmark evaluation: {e(report['split'])} split</h1>",
           f'<p class="sub">{e(report["labels"])} &middot; predictions from '
           f'{e(report.get("source") or "the model file")} &middot; model '
           f'{page.figure("model_version", report.get("model_version") or "-")}</p>',
           page.cards([
               ("samples", "faces scored", page.number(report["samples"])),
               ("nme", "mean NME (inter-ocular)", _percent(report["nme"])),
               ("nme_median", "median NME", _percent(report["nme_median"])),
               ("failure_rate", f"failure rate (NME > {t:g})",
                _percent(report[f"failure_rate@{t:g}"])),
               ("auc", f"AUC at {t:g}", f"{report[f'auc@{t:g}']:.3f}"),
               ("missed_faces", "labelled faces not found", page.number(report["missed_faces"])),
               ("skipped_labels", "unusable labels", page.number(report["skipped_labels"])),
               ("missing_predictions", "labels without a prediction",
                page.number(report["missing_predictions"]))])]
    out.append('<div class="grid2"><div><h2>Cumulative error distribution</h2>')
    out.append(svg.line_chart(
        [(f"{report['split']}", [100 * x for x in errors], [100 * y for y in fractions])],
        x_label="NME (% of the inter-ocular distance)", y_label="% of faces", y_max=100,
        step=True, name="ced"))
    out.append(f'<p class="note">Faces with an NME at most x; a labelled face that detection '
               f"missed never counts as found. The AUC is the area under this curve up to "
               f"{100 * t:g} %, over {100 * t:g}.</p>")
    out.append("</div><div><h2>NME by face region</h2>")
    regions = [(k, 100 * v) for k, v in report["nme_by_region"].items() if math.isfinite(v)]
    out.append(svg.bars(regions, unit=" %", digits=2, name="regions"))
    out.append("</div></div>")
    worst = report.get("worst") or []
    if worst:
        out.append("<h2>Worst faces</h2>")
        out.append(page.table(["key", "NME"], [(key, f"{100 * v:.2f}") for key, v in worst],
                              numeric=[1], sortable=True))
    if report.get("missed"):
        out.append("<h2>Labelled faces not found</h2>")
        out.append(page.table(["key"], [(k if isinstance(k, str) else json.dumps(k),)
                                        for k in report["missed"]]))
    config = report.get("config") or {}
    out.append("<h2>Settings</h2>")
    out.append(page.table(["setting", "value"],
                          [(k, v if isinstance(v, str) else json.dumps(v))
                           for k, v in sorted(config.items())]))
    return page.document(f"Landmark evaluation ({report['split']})", "".join(out))
