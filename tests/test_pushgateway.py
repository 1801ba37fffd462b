"""Run outcomes pushed to a real Prometheus Pushgateway on loopback (no Ray here; the jobs'
pushes are checked in test_cli.py and test_nightly.py), and the alerting rules that use them."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import yaml
from support.prometheus_text import samples
from support.pushgateway_server import series

from pipeline.cli.common import pushed_outcome
from pipeline.io.pushgateway import LAST_SUCCESS, RunOutcome, push

ROOT = Path(__file__).resolve().parents[1]


def labels(**items) -> tuple:
    return tuple(sorted(items.items()))


def need(pushgateway):
    if pushgateway is None:
        pytest.skip("prometheus-pushgateway is not installed (apt-get install "
                    "prometheus-pushgateway; .ci/run installs it)")
    return pushgateway


def test_a_failed_run_keeps_the_last_success_and_replaces_the_rest(pushgateway):
    url = need(pushgateway)
    output = "s3://user:s3cr3t@bucket/landmarks/?X-Amz-Signature=planted"
    ok = RunOutcome("landmarks_test_a", output, started=1000.0, finished=1060.5, success=True,
                    rows=500, errors=3, errors_by_kind={"invalid": 2, "truncated": 1})
    assert push(url, ok)
    out = "s3://bucket/landmarks/"  # no user, password or query string
    group = labels(output=out)
    assert series(url, "landmarks_test_a") == {
        (LAST_SUCCESS, labels(output=out, outcome="success")): 1060.5,
        ("landmarks_last_run_timestamp_seconds", group): 1060.5,
        ("landmarks_last_run_success", group): 1.0,
        ("landmarks_last_run_duration_seconds", group): 60.5,
        ("landmarks_last_run_rows", group): 500.0,
        ("landmarks_last_run_errors", group): 3.0,
        ("landmarks_last_run_errors_by_kind", labels(output=out, kind="invalid")): 2.0,
        ("landmarks_last_run_errors_by_kind", labels(output=out, kind="truncated")): 1.0,
    }
    failed = RunOutcome("landmarks_test_a", output, started=2000.0, finished=2010.0,
                        rows=7, errors=7, errors_by_kind={"shard_error": 7})
    assert push(url, failed)
    after = series(url, "landmarks_test_a")
    assert after[(LAST_SUCCESS, labels(output=out, outcome="success"))] == 1060.5  # kept
    assert after[("landmarks_last_run_success", group)] == 0.0
    assert after[("landmarks_last_run_timestamp_seconds", group)] == 2010.0
    kinds = {dict(labels)["kind"]: v for (name, labels), v in after.items()
             if name == "landmarks_last_run_errors_by_kind"}
    assert kinds == {"shard_error": 7.0}  # last night's kinds are gone
    text = repr(samples(f"{url}/metrics"))
    assert "s3cr3t" not in text and "planted" not in text and "user" not in text


def test_a_gateway_that_is_down_never_fails_the_run(caplog):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with caplog.at_level(logging.WARNING):
        assert push(f"http://127.0.0.1:{port}", RunOutcome("j", "/out", success=True),
                    timeout=2) is False
    assert "could not push" in caplog.text


def test_a_command_that_raises_pushes_a_failure(pushgateway):
    url = need(pushgateway)
    args = argparse.Namespace(pushgateway=url)
    with pytest.raises(RuntimeError, match="stage failed"), \
            pushed_outcome(args, "landmarks_test_b", "/data/out") as outcome:
        outcome.rows = 12
        raise RuntimeError("stage failed")
    pushed = series(url, "landmarks_test_b")
    group = (("output", "/data/out"),)
    assert pushed[("landmarks_last_run_success", group)] == 0.0
    assert pushed[("landmarks_last_run_rows", group)] == 12.0
    assert not [k for k in pushed if k[0] == LAST_SUCCESS]
    with pushed_outcome(argparse.Namespace(pushgateway=None), "landmarks_test_b", "/x") as o:
        o.success = True  # no --pushgateway: nothing pushed
    assert ("landmarks_last_run_success", (("output", "/x"),)) not in series(url,
                                                                           "landmarks_test_b")


def test_alerting_rules_use_what_the_jobs_push():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert set(exprs) == {"LandmarksNightlyNoSuccess", "LandmarksNightlyNeverSucceeded",
                          "LandmarksRunFailed"}
    assert LAST_SUCCESS in exprs["LandmarksNightlyNoSuccess"] and "26 * 3600" in \
        exprs["LandmarksNightlyNoSuccess"]
    assert f"absent({LAST_SUCCESS}" in exprs["LandmarksNightlyNeverSucceeded"]
    assert "landmarks_last_run_success == 0" in exprs["LandmarksRunFailed"]
    for expr in exprs.values():
        assert 'job="landmarks_nightly"' in expr or "landmarks_last_run_success" in expr
