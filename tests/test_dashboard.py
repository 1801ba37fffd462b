"""deploy/grafana/landmarks.json: importable as is, and it queries only what the job exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.backend import metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "landmarks.json"


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = {f"ray_{name}" for name in metrics.ALL}  # Ray prefixes every name with ray_
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = re.findall(r"\bray_landmarks_[a-z_]+", target["expr"])
            assert names, target["expr"]
            for name in names:
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                assert base in exported, f"{panel['title']}: {name} is not exported"
                if name != base:
                    assert base[len("ray_"):] in metrics.HISTOGRAMS, name
                queried.add(base)
    assert queried == exported  # every figure the job exports has a panel
    (variable,) = dashboard["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource", "datasource", "prometheus")
