"""Nightly incremental runs over date partitions, and their ledger (pipeline/ops/nightly.py)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli.main import main
from pipeline.demo.synthetic import write_sample_archive
from pipeline.io.report import Summary
from pipeline.ops.nightly import (
    default_date,
    first_night,
    list_partitions,
    partition_uri,
    read_ledger,
    root_of,
)

FAST = ["--device", "cpu", "--batch-size", "2"]


def _shard(partition, name="faces-00000", faces=1, seed=0):
    """A tiny tar shard ``name.tar`` in ``partition`` (written aside, then moved in whole)."""
    staging = partition.parent / f".staging-{name}-{seed}"
    write_sample_archive(str(staging), 1, faces, seed=seed, image_size=(96, 72))
    partition.mkdir(parents=True, exist_ok=True)
    shutil.move(staging / "faces-00000.tar", partition / f"{name}.tar")
    shutil.rmtree(staging)


def _nightly(src, out, *extra):
    return main(["nightly", "--input", str(src), "--output", str(out), *FAST, *extra])


def _mtime(path):
    return path.stat().st_mtime_ns


@pytest.fixture(scope="module")
def nights(ray_session, pushgateway, tmp_path_factory):
    """One output through four nightly runs (3 small Ray jobs in all), with what each left:

    A ``--date 2026-11-20``: faces-00000 (2 faces) arrived that night (its outcome pushed to
      the test's Pushgateway, where one is installed).
    B the same night again.
    Then faces-00001 (1 face) arrives for 2026-11-20, and a partition for 2026-11-17.
    C ``--since 2026-11-18 --date 2026-11-21`` (no partition for 2026-11-21).
    D ``--date 2026-11-20 --seed 1``: another model version.
    """
    tmp = tmp_path_factory.mktemp("nights")
    src, out = tmp / "incoming", tmp / "landmarks"
    night = out / "date=2026-11-20"
    _shard(src / "date=2026-11-20", "faces-00000", faces=2, seed=1)
    runs = {}

    def run(label, *extra):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = _nightly(src, out, *extra)
        runs[label] = {"code": code, "out": printed.getvalue(),
                       "record": read_ledger(str(out))[-1],
                       "mtimes": {p.relative_to(out).as_posix(): _mtime(p)
                                  for p in out.glob("date=*/part-*.parquet")}}

    run("A", "--date", "2026-11-20", *(["--pushgateway", pushgateway] if pushgateway else []))
    runs["A"]["pushgateway"] = pushgateway
    runs["A"]["table"] = pq.read_table(night / "part-faces-00000.parquet")
    run("B", "--date", "2026-11-20")
    _shard(src / "date=2026-11-20", "faces-00001", seed=2)
    _shard(src / "date=2026-11-17", "faces-00000", seed=4)  # before --since: left alone
    run("C", "--since", "2026-11-18", "--date", "2026-11-21")
    runs["C"]["tables"] = {p.relative_to(out).as_posix(): pq.read_table(p)
                           for p in out.glob("date=*/part-*.parquet")}
    run("D", "--date", "2026-11-20", "--seed", "1")
    runs["D"]["tables"] = {p.name: pq.read_table(p) for p in night.glob("part-*.parquet")}
    return src, out, runs


def _counts(entry):
    return {k: entry.get(k) for k in ("status", "shards_found", "shards_processed",
                                      "shards_skipped", "samples", "processed")}


def test_nightly_pushes_its_outcome(nights):
    src, out, runs = nights
    gateway = runs["A"]["pushgateway"]
    if gateway is None:
        pytest.skip("prometheus-pushgateway is not installed (.ci/run installs it)")
    from support.pushgateway_server import series

    pushed = series(gateway, "landmarks_nightly")
    group = (("output", str(out)),)
    run = {name: v for (name, labels), v in pushed.items() if labels == group}
    totals = runs["A"]["record"]["totals"]
    assert (run["landmarks_last_run_success"], run["landmarks_last_run_rows"],
            run["landmarks_last_run_errors"]) == (1.0, totals["samples"], 0.0) == (1.0, 2, 0.0)
    assert pushed[("landmarks_last_success_timestamp_seconds", (("outcome", "success"),) +
                   group)] == run["landmarks_last_run_timestamp_seconds"]
    assert "pushgateway" not in (out / "_config.yaml").read_text()


def test_same_night_twice_does_nothing_the_second_time(nights, capsys):
    src, out, runs = nights
    a, b = runs["A"], runs["B"]
    assert a["code"] == b["code"] == 0
    assert a["table"].num_rows == 2 and a["table"].column("error").null_count == 2
    assert "date 2026-11-20: 2 samples in 1 shards (0 already done)" in a["out"]
    assert "nightly: 1 date(s) (1 ok): 1 shard(s) processed, 0 already done" in a["out"]
    assert "date 2026-11-20: 0 samples in 0 shards (1 already done)" in b["out"]
    assert b["mtimes"] == a["mtimes"]  # the part file was not rewritten

    (day_a,), (day_b,) = a["record"]["dates"], b["record"]["dates"]
    assert _counts(day_a) == {"status": "ok", "shards_found": 1, "shards_processed": 1,
                              "shards_skipped": 0, "samples": 2, "processed": ["faces-00000"]}
    assert _counts(day_b) == {"status": "ok", "shards_found": 1, "shards_processed": 0,
                              "shards_skipped": 1, "samples": 0, "processed": []}
    assert day_a["input"] == str(src / "date=2026-11-20")
    assert day_a["output"] == str(out / "date=2026-11-20")
    for record in (a["record"], b["record"]):
        assert (record["status"], record["exit_code"]) == ("ok", 0)
        assert record["finished"] and record["host"] and record["model_version"]
        assert record["selection"]["date"] == "2026-11-20"
        assert "storage_options" in record["config"]

    records = read_ledger(str(out))
    assert [r["run_id"] for r in records] == [runs[k]["record"]["run_id"] for k in "ABCD"]
    assert [r["status"] for r in records] == ["ok"] * 4
    assert len(list((out / "_ledger").glob("*.json"))) == 4
    # The resolved config is saved at the output root, without the run's dates.
    saved = yaml.safe_load((out / "_config.yaml").read_text())
    assert saved["batch_size"] == 2 and saved["input"] == str(src)
    assert "date" not in saved and "since" not in saved

    assert main(["ledger", "--output", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["started", "run", "dates", "status"]
    assert [line.split()[2:6] for line in lines[1:3]] == [
        ["2026-11-20", "ok", "1", "0"], ["2026-11-20", "ok", "0", "1"]]
    assert len(lines) == 5
    assert main(["ledger", "--output", str(out), "--json", "--last", "1"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == [
        runs["D"]["record"]["run_id"]]


def test_a_new_shard_is_processed_by_the_next_run_alone(nights):
    _, _, runs = nights
    c = runs["C"]
    day = next(d for d in c["record"]["dates"] if d["date"] == "2026-11-20")
    assert _counts(day) == {"status": "ok", "shards_found": 2, "shards_processed": 1,
                            "shards_skipped": 1, "samples": 1, "processed": ["faces-00001"]}
    # faces-00000's file from run A is untouched; the new shard has its own file.
    assert list(runs["B"]["mtimes"]) == ["date=2026-11-20/part-faces-00000.parquet"]
    assert {k: c["mtimes"][k] for k in runs["B"]["mtimes"]} == runs["B"]["mtimes"]
    new = c["tables"]["date=2026-11-20/part-faces-00001.parquet"]
    assert new.num_rows == 1 and new.column("shard")[0].as_py().endswith(
        "date=2026-11-20/faces-00001.tar")


def test_since_covers_the_existing_partitions_and_records_a_missing_night(nights):
    _, out, runs = nights
    c = runs["C"]
    assert c["code"] == 0 and c["record"]["status"] == "ok"
    assert c["record"]["selection"] == {**c["record"]["selection"], "since": "2026-11-18",
                                        "date": "2026-11-21"}
    by_date = {d["date"]: d for d in c["record"]["dates"]}
    assert list(by_date) == ["2026-11-20", "2026-11-21"]  # 2026-11-17 is before --since
    assert (by_date["2026-11-21"]["status"], by_date["2026-11-21"]["message"]) == (
        "no_input", "input partition does not exist")
    assert c["record"]["totals"] == {**c["record"]["totals"], "dates": 2, "dates_ok": 1,
                                     "dates_no_input": 1, "shards_processed": 1,
                                     "shards_skipped": 1, "samples": 1}
    assert "date 2026-11-21: no input" in c["out"]
    assert "nightly: 2 date(s) (1 ok, 1 no_input)" in c["out"]
    assert not (out / "date=2026-11-17").exists() and not (out / "date=2026-11-21").exists()


def test_a_new_model_version_redoes_the_night(nights):
    _, _, runs = nights
    d = runs["D"]
    (day,) = d["record"]["dates"]
    assert d["code"] == 0
    assert _counts(day) == {"status": "ok", "shards_found": 2, "shards_processed": 2,
                            "shards_skipped": 0, "samples": 3,
                            "processed": ["faces-00000", "faces-00001"]}
    assert day["model_version"] != runs["A"]["record"]["model_version"]
    for table in d["tables"].values():
        assert set(table.column("model_version").to_pylist()) == {day["model_version"]}
    for name, mtime in runs["C"]["mtimes"].items():
        assert d["mtimes"][name] != mtime, name  # rewritten


# -- without Ray ----------------------------------------------------------------------------


def test_default_date_is_yesterday_in_utc():
    utc = timezone.utc
    assert default_date(datetime(2026, 11, 22, 0, 30, tzinfo=utc)) == "2026-11-21"
    # 01:00 at UTC+2 is still the 21st in UTC.
    assert default_date(datetime(2026, 11, 22, 1, 0, tzinfo=timezone(timedelta(hours=2)))) \
        == "2026-11-20"
    assert default_date(datetime(2026, 3, 1, 12, tzinfo=utc)) == "2026-02-28"
    assert default_date() == (datetime.now(utc).date() - timedelta(days=1)).isoformat()


def test_partitions_and_templates(tmp_path):
    assert partition_uri("s3://b/in/", "2026-11-20") == "s3://b/in/date=2026-11-20"
    assert partition_uri("s3://b/in/{date}/x", "2026-11-20") == "s3://b/in/2026-11-20/x"
    assert partition_uri("gs://b/in/dt={date}", "2026-11-20") == "gs://b/in/dt=2026-11-20"
    assert root_of("s3://b/in/dt={date}/x/") == "s3://b/in" and root_of("s3://b/in/") == "s3://b/in"
    with pytest.raises(ValueError, match="fixed folder"):
        root_of("s3://{date}/x")
    for day in ("2026-11-18", "2026-11-19", "2026-02-30"):
        (tmp_path / "t" / f"dt={day}" / "in").mkdir(parents=True)
        (tmp_path / "p" / f"date={day}").mkdir(parents=True)
    (tmp_path / "t" / "other").mkdir()
    (tmp_path / "p" / "date=2026-11-21").write_text("a file, not a partition")
    (tmp_path / "p" / "_ledger").mkdir()
    assert list_partitions(f"{tmp_path}/t/dt={{date}}/in") == ["2026-11-18", "2026-11-19"]
    assert list_partitions(str(tmp_path / "p")) == ["2026-11-18", "2026-11-19"]
    with pytest.raises(FileNotFoundError, match="input root not found"):
        list_partitions(str(tmp_path / "nope"))


def test_bad_arguments_exit_2(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    args = ["nightly", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    for bad in ("2026-11-31", "20261120", "yesterday"):
        with pytest.raises(SystemExit) as exc:
            main([*args, "--date", bad])
        assert exc.value.code == 2
        assert "--date: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["nightly", "--input", str(tmp_path / "in")])
    assert exc.value.code == 2 and "--output" in capsys.readouterr().err
    assert main([*args, "--since", "2026-11-21", "--date", "2026-11-20"]) == 2
    assert "--since 2026-11-21 is after --date 2026-11-20" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_input_root_is_an_error_and_is_recorded(tmp_path, capsys):
    """Default date (yesterday), input and output from a --config file; a typo in the input
    root must not look like a night without input."""
    config = tmp_path / "nightly.yaml"
    config.write_text(f"input: {tmp_path / 'typo'}\noutput: {tmp_path / 'out'}\n"
                      "device: cpu\n")
    assert main(["nightly", "--config", str(config)]) == 2
    assert "input root not found" in capsys.readouterr().err
    (record,) = read_ledger(str(tmp_path / "out"))
    assert (record["status"], record["exit_code"]) == ("error", 2)
    assert "input root not found" in record["error"]
    assert record["selection"]["date"] == default_date()


def test_a_night_without_input_is_not_an_error(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "date=2026-11-20").mkdir(parents=True)
    (src / "date=2026-11-20" / "_SUCCESS").write_text("")  # empty apart from a marker
    assert _nightly(src, out, "--date", "2026-11-20") == 0
    assert _nightly(src, out, "--date", "2026-11-21") == 0
    printed = capsys.readouterr().out
    assert "date 2026-11-20: no input" in printed and "is empty" in printed
    assert "date 2026-11-21: no input" in printed and "does not exist" in printed
    records = read_ledger(str(out))
    assert [r["status"] for r in records] == ["no_input", "no_input"]
    assert [r["dates"][0]["message"] for r in records] == [
        "input partition is empty", "input partition does not exist"]
    assert "previous run" in caplog.text and "did not finish" not in caplog.text


def test_errors_and_interrupted_runs_are_recorded(tmp_path, monkeypatch, caplog):
    """A date that raises does not stop the others; a killed run leaves a record that says so,
    and the next run reports it."""
    import pipeline.inference.job

    src, out = tmp_path / "in", tmp_path / "out"
    for day in ("2026-11-19", "2026-11-20"):
        (src / f"date={day}").mkdir(parents=True)
        (src / f"date={day}" / "faces-00000.tar").write_bytes(b"x")

    def fake(cfg):
        if "2026-11-19" in cfg.input:
            raise RuntimeError("the cluster went away")
        return Summary(1, 3, 0, 1.0, "v1", cfg.output, [f"{cfg.output}/part-faces-00000.parquet"])

    monkeypatch.setattr(pipeline.inference.job, "run_inference", fake)
    assert _nightly(src, out, "--since", "2026-11-19", "--date", "2026-11-20") == 1
    (record,) = read_ledger(str(out))
    assert (record["status"], record["exit_code"]) == ("error", 1)
    assert [(d["date"], d["status"]) for d in record["dates"]] == [
        ("2026-11-19", "error"), ("2026-11-20", "ok")]
    assert "the cluster went away" in record["dates"][0]["message"]
    assert record["dates"][1]["processed"] == ["faces-00000"]

    def killed(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.inference.job, "run_inference", killed)
    with pytest.raises(KeyboardInterrupt):
        _nightly(src, out, "--date", "2026-11-20")
    assert read_ledger(str(out))[-1]["status"] == "interrupted"
    # A run killed hard leaves its "running" record; the next run says it did not finish.
    stale = dict(read_ledger(str(out))[-1], status="running", finished=None,
                 run_id="20991231T000000Z-dead00", started="2099-12-31T00:00:00+00:00")
    (out / "_ledger" / "20991231T000000Z-dead00.json").write_text(json.dumps(stale))
    monkeypatch.setattr(pipeline.inference.job, "run_inference", fake)
    caplog.clear()
    assert _nightly(src, out, "--date", "2026-11-20") == 0
    assert "20991231T000000Z-dead00" in caplog.text and "did not finish" in caplog.text


def test_date_templates_end_to_end(tmp_path, monkeypatch):
    """URIs with {date}: partitions are the filled-in URIs, --since finds them by glob, and the
    ledger and config live in the folder before {date}. (The job itself is faked.)"""
    import pipeline.inference.job

    src, out = tmp_path / "in", tmp_path / "out"
    for day in ("2026-11-18", "2026-11-19"):
        (src / f"day-{day}" / "faces").mkdir(parents=True)
        (src / f"day-{day}" / "faces" / "faces-00000.tar").write_bytes(b"x")
    (src / "day-latest").mkdir()
    seen = []

    def fake(cfg):
        seen.append((cfg.input, cfg.output))
        return Summary(1, 1, 0, 1.0, "v1", cfg.output, [f"{cfg.output}/part-faces-00000.parquet"])

    monkeypatch.setattr(pipeline.inference.job, "run_inference", fake)
    template_in, template_out = f"{src}/day-{{date}}/faces/", f"{out}/{{date}}/landmarks"
    assert _nightly(template_in, template_out, "--since", "2026-11-01", "--date",
                    "2026-11-20") == 0
    assert seen == [(f"{src}/day-{d}/faces/", f"{out}/{d}/landmarks")
                    for d in ("2026-11-18", "2026-11-19")]
    (record,) = read_ledger(template_out)
    assert read_ledger(str(out)) == [record] and (out / "_config.yaml").exists()
    assert [(d["date"], d["status"]) for d in record["dates"]] == [
        ("2026-11-18", "ok"), ("2026-11-19", "ok"), ("2026-11-20", "no_input")]


def test_partitions_and_ledger_on_s3(tmp_path, monkeypatch, capsys):
    """Listing partitions, finding a night without input and reading the ledger through s3fs,
    against moto's S3 server on loopback (the job itself is faked)."""
    import boto3
    from moto.server import ThreadedMotoServer

    import pipeline.inference.job

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "testing", "secret": "testing-secret",
                   "endpoint_url": f"http://{host}:{port}",
                   "client_kwargs": {"region_name": "us-east-1"}}
        client = boto3.client("s3", endpoint_url=options["endpoint_url"], region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing-secret")
        client.create_bucket(Bucket="nightly")
        for key in ("in/date=2026-11-18/faces-00000.tar", "in/date=2026-11-19/faces-00000.tar",
                    "in/date=2026-11-19/faces-00001.tar", "in/date=2026-11-20/_SUCCESS",
                    "in/notes.txt"):
            client.put_object(Bucket="nightly", Key=key, Body=b"x")
        seen = []

        def fake(cfg):
            seen.append(cfg.input)
            files = [f"{cfg.output}/part-faces-0000{i}.parquet"
                     for i in range(2 if cfg.input.endswith("19") else 1)]
            return Summary(len(files), len(files), 0, 1.0, "v1", cfg.output, files)

        monkeypatch.setattr(pipeline.inference.job, "run_inference", fake)
        args = ["nightly", "--input", "s3://nightly/in/", "--output", "s3://nightly/out/",
                "--storage-options", json.dumps(options)]
        assert list_partitions("s3://nightly/in/", options) == [
            "2026-11-18", "2026-11-19", "2026-11-20"]
        assert main([*args, "--since", "2026-11-19", "--date", "2026-11-21"]) == 0
        assert seen == ["s3://nightly/in/date=2026-11-19"]
        (record,) = read_ledger("s3://nightly/out/", options)
        assert [(d["date"], d["status"], d.get("message")) for d in record["dates"]] == [
            ("2026-11-19", "ok", None),
            ("2026-11-20", "no_input", "input partition is empty"),
            ("2026-11-21", "no_input", "input partition does not exist")]
        assert record["dates"][0]["processed"] == ["faces-00000", "faces-00001"]
        assert "testing-secret" not in json.dumps(record)  # option names only
        assert main(["nightly", "--input", "s3://nightly/typo/", "--output",
                     "s3://nightly/out/", "--storage-options", json.dumps(options)]) == 2
        assert "input root not found: s3://nightly/typo" in capsys.readouterr().err
        assert main(["ledger", "--output", "s3://nightly/out/", "--storage-options",
                     json.dumps(options)]) == 0
        rows = [re.split(r"\s{2,}", line) for line in capsys.readouterr().out.splitlines()]
        assert [(row[2], row[3]) for row in rows[1:]] == [
            ("2026-11-19..2026-11-21 (3)", "ok"), (default_date(), "error")]
    finally:
        server.stop()


def test_lookback_days_reach_back_from_the_date(tmp_path, capsys):
    """A failed night is finished by the next run: lookback_days (in the nightly config) makes
    each run also cover the partitions of the nights before its date; --since wins."""
    assert first_night("2026-11-21", None, 0) is None  # the date alone
    assert first_night("2026-11-21", None, 3) == "2026-11-18"
    assert first_night("2026-03-01", None, 1) == "2026-02-28"
    assert first_night("2026-11-21", "2026-11-01", 3) == "2026-11-01"
    with pytest.raises(ValueError, match="--lookback-days must be >= 0"):
        first_night("2026-11-21", None, -1)
    (tmp_path / "in").mkdir()
    with pytest.raises(SystemExit) as usage:  # the range is the option's: a usage error
        main(["nightly", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
              "--lookback-days", "-2"])
    assert usage.value.code == 2
    assert "argument --lookback-days: must be >= 0, got -2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
