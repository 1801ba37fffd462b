"""Dying processes and resumed runs: the output ends up exactly as one clean run's.

Each fault fires where it can do harm: a read task dies after it delivered a unit, a predictor
dies with a unit's landmarks computed but not returned, a commit dies between its data file and
its completion record, the driver dies with some files committed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.helpers import cluster_job, write_tar

from pipeline.demo.synthetic import write_sample_archive
from pipeline.inference.config import InferConfig
from pipeline.inference.job import run_inference
from pipeline.io.report import read_receipts
from pipeline.model.network import load_model, save_model
from pipeline.stages import faults

ROOT = Path(__file__).resolve().parents[1]
SHARDS, PER_SHARD = 4, 2


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    write_sample_archive(str(root / "in"), SHARDS, PER_SHARD, seed=21, image_size=(96, 72))
    return root


def _cfg(archive, output, weights, **kw):
    # One row per unit, so every run (whatever fails in it) computes each image alone and the
    # outputs compare exactly, and a read task delivers units before it reaches a later row.
    return InferConfig(input=str(archive / "in"), output=str(output), weights=weights,
                       batch_size=2, unit_rows=1, **kw)


def _output(folder: Path) -> dict:
    return {p.name: pq.read_table(p) for p in sorted(folder.glob("*.parquet"))}


@pytest.fixture(scope="module")
def clean(ray_session, archive, weights_file):
    """One uninterrupted run: the reference every recovered run must equal."""
    summary = run_inference(_cfg(archive, archive / "clean", weights_file[0]))
    assert (summary.samples, summary.errors) == (SHARDS * PER_SHARD, 0)
    return _output(archive / "clean")


def _assert_same_output(folder: Path, clean: dict, summary=None) -> None:
    got = _output(folder)
    assert list(got) == list(clean)
    for name, table in got.items():
        assert table.equals(clean[name]), name
    keys = [k for t in got.values() for k in t.column("key").to_pylist()]
    assert len(keys) == len(set(keys)) == SHARDS * PER_SHARD  # every sample exactly once
    if summary is not None:  # and counted once: one receipt per file, rows once each
        files = [r["file"] for r in read_receipts(str(folder))]
        assert sorted(files) == list(clean)
        assert (summary.samples, summary.errors, summary.files_committed) == (
            SHARDS * PER_SHARD, 0, len(clean))


@pytest.mark.parametrize("fault, marker", [
    # The read task dies at row 1 of faces-00002, after it delivered the units before that row
    # (which go on to be predicted and committed); Ray replays it.
    ("read=faces-00002@1", "read-faces-00002-1"),
    # The predictor dies in its 3rd call with that unit's landmarks computed, not returned.
    ("predict=3", "predict-3"),
    # The commit of faces-00001 dies after its Parquet file is in place, before its record.
    ("commit=faces-00001", "commit-faces-00001"),
])
def test_process_killed_mid_unit(ray_session, archive, weights_file, clean, tmp_path, fault,
                                 marker, monkeypatch):
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv(faults.ENV, f"dir={marks};{fault}")  # read by the driver, not a setting
    summary = run_inference(_cfg(archive, tmp_path / "out", weights_file[0]))
    assert (marks / marker).exists()  # the process really died there
    if fault.startswith("read"):  # it died after handing over units, not before any
        assert int((marks / marker).read_text().removeprefix("units_delivered=")) >= 1
    _assert_same_output(tmp_path / "out", clean, summary)
    # The run says what Ray ran again (the report's "Retries and restarts"): that stage, once.
    stage = fault.split("=")[0]
    expected = dict.fromkeys(("read", "predict", "commit", "predictor_restarts",
                              "agent_restarts", "leases_lost"), 0)
    expected[stage] = 1
    expected["predictor_restarts"] = int(stage == "predict")
    if stage == "predict":  # the call it died in and the one queued behind it (2 per actor)
        assert 1 <= summary.retries["predict"] <= 2, summary.retries
        expected["predict"] = summary.retries["predict"]
    assert summary.retries == expected


def test_split_shards_resume_only_their_missing_pieces(ray_session, archive, weights_file,
                                                       tmp_path):
    """rows_per_file=1: each shard of 2 rows is 2 files; with one piece's record gone (a crash
    between data and record), a rerun commits that piece alone."""
    out = tmp_path / "out"
    first = run_inference(_cfg(archive, out, weights_file[0], rows_per_file=1))
    assert first.files_committed == SHARDS * PER_SHARD
    assert sorted(p.name for p in out.glob("part-faces-00001*")) == [
        "part-faces-00001.c00001.parquet", "part-faces-00001.parquet"]
    before = _output(out)
    (out / "_done" / "faces-00001.c00001.json").unlink()
    again = run_inference(_cfg(archive, out, weights_file[0], rows_per_file=1))
    assert again.files == [f"{out}/part-faces-00001.c00001.parquet"]
    assert (again.samples, again.skipped_shards, again.skipped_rows) == (1, SHARDS - 1, 7)
    after = _output(out)
    assert list(after) == list(before)
    for name, table in after.items():
        assert table.equals(before[name]), name


def test_a_resume_passing_slowly_over_done_pieces_is_not_a_stall(ray_session, weights_file,
                                                                 tmp_path, monkeypatch):
    """A resumed shard whose done pieces take longer to stream past than --stall-timeout was
    stopped as stalled on every rerun (issue 21): no unit comes while a read task passes
    over done rows. Its beats (one per 16 rows passed over) are progress: here 96 done rows
    at 0.15 s each (14 s) under an 8 s --stall-timeout, and the last piece is redone."""
    from PIL import Image
    from support.helpers import jpeg

    (tmp_path / "in").mkdir()
    members = [(f"bad-{i:04d}.jpg", b"not an image") for i in range(96)]  # cheap done rows
    members.append(("face.jpg", jpeg(Image.new("RGB", (64, 48), (90, 120, 150)))))
    write_tar(tmp_path / "in" / "big.tar", members)
    out = tmp_path / "out"
    cfg = InferConfig(input=str(tmp_path / "in"), output=str(out), weights=weights_file[0],
                      batch_size=4, rows_per_file=32, stall_timeout=8)
    first = run_inference(cfg)
    assert (first.samples, first.errors, first.files_committed) == (97, 96, 4)
    (out / "_done" / "big.c00003.json").unlink()  # the last piece: to do again
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv(faults.ENV, f"dir={marks};slow=0.15")
    again = run_inference(cfg)
    assert (again.samples, again.errors, again.skipped_rows) == (1, 0, 96)
    assert again.files == [f"{out}/part-big.c00003.parquet"]
    assert pq.read_table(out / "part-big.c00003.parquet").column("key").to_pylist() == ["face"]


def test_rerun_skips_done_shards_and_redoes_changed_ones(ray_session, archive, weights_file,
                                                          clean, tmp_path):
    out = tmp_path / "out"
    run_inference(_cfg(archive, out, weights_file[0]))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = run_inference(_cfg(archive, out, weights_file[0]))
    assert (again.skipped_shards, again.samples, again.files) == (SHARDS, 0, [])
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == stamps

    # One input shard rewritten (same content, new mtime: its fingerprint changes).
    shard = archive / "in" / "faces-00001.tar"
    os.utime(shard, (time.time() + 5, time.time() + 5))
    third = run_inference(_cfg(archive, out, weights_file[0]))
    assert third.files == [f"{out}/part-faces-00001.parquet"] and third.skipped_shards == 3
    _assert_same_output(out, clean)

    forced = run_inference(_cfg(archive, out, weights_file[0], force=True))
    assert forced.skipped_shards == 0 and len(forced.files) == SHARDS


def test_weights_replaced_during_a_run_change_nothing_in_it(ray_session, archive,
                                                            weights_file, tmp_path,
                                                            monkeypatch):
    """The model file is replaced at its URI once the run has its version, before any actor
    loads a model (issue 21: rows then carried the new version and records the old, so a
    later run skipped those shards for good; or the run stopped). The run read the bytes
    once and gives every actor those: rows, records and manifest all carry the first version.
    A rerun with the new file redoes everything with it."""
    import json
    import shutil

    from pipeline.inference import job

    path = tmp_path / "model.pt"
    shutil.copy(weights_file[0], path)
    other, _ = load_model(init="random", seed=99)
    identity, replaced = job.model_identity, []

    def identify_then_replace(*args, **kwargs):
        info = identity(*args, **kwargs)
        replaced.append(save_model(other, str(path)))  # the URI now holds another model
        return info

    monkeypatch.setattr(job, "model_identity", identify_then_replace)
    out = tmp_path / "out"
    summary = run_inference(_cfg(archive, out, str(path)))
    first = weights_file[2]
    assert replaced and replaced[0] != first
    assert (summary.samples, summary.errors, summary.model_version) == (
        SHARDS * PER_SHARD, 0, first)
    rows = {v for t in _output(out).values() for v in t.column("model_version").to_pylist()}
    records = {json.loads(p.read_text())["model_version"] for p in (out / "_done").glob("*")}
    assert rows == records == {first}
    assert json.loads((out / "_manifest.json").read_text())["model_version"] == first

    monkeypatch.undo()
    again = run_inference(_cfg(archive, out, str(path)))
    assert again.skipped_shards == 0 and again.samples == SHARDS * PER_SHARD
    assert {v for t in _output(out).values() for v in t.column("model_version").to_pylist()} \
        == {replaced[0]}


def test_killed_driver_then_rerun_equals_one_clean_run(ray_session, archive, weights_file,
                                                        clean, tmp_path):
    """The driver (a separate process on the same Ray cluster) is SIGKILLed after its first
    file is committed; the rerun redoes only the rest and the output equals a clean run."""
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, "jobs/infer.py", "--input", str(archive / "in"), "--output", str(out),
         "--weights", weights_file[0], "--batch-size", "2", "--unit-rows", "1"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "driver.log").open("w"))
    deadline = time.time() + 240
    while not list((out / "_done").glob("*.json")) if (out / "_done").exists() else True:
        assert driver.poll() is None, ("the driver ended before it could be killed: "
                                       + (tmp_path / "driver.log").read_text()[-3000:])
        assert time.time() < deadline, "no shard was committed in time"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(2)  # commit tasks of the dead driver's job may still finish a file meanwhile

    summary = run_inference(_cfg(archive, out, weights_file[0]))
    # The rerun commits exactly the files that were missing, and nothing twice.
    assert 1 <= summary.skipped_shards < SHARDS
    assert summary.files_committed == SHARDS - summary.skipped_shards
    assert summary.samples == (SHARDS - summary.skipped_shards) * PER_SHARD
    _assert_same_output(out, clean)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def _assert_same_landmarks(folder: Path, clean: dict) -> None:
    got = _output(folder)
    assert list(got) == list(clean)
    for name, table in got.items():
        assert table.column("key").equals(clean[name].column("key")), name
        np.testing.assert_allclose(np.asarray(table.column("landmarks").to_pylist()),
                                   np.asarray(clean[name].column("landmarks").to_pylist()),
                                   atol=1e-4)


def test_a_one_cpu_cluster_finishes(archive, weights_file, clean, tmp_path):
    """The CPU predictor, the read tasks and the commits share one CPU: the planner leaves the
    reads and commits part of it, so the job makes progress instead of waiting for ever."""
    out = tmp_path / "out"
    result = cluster_job("one-cpu", str(archive / "in"), str(out), weights_file[0])
    assert result == {"samples": SHARDS * PER_SHARD, "errors": 0, "cluster_cpus": 1.0}
    _assert_same_landmarks(out, clean)


def test_chaos_on_a_small_cluster_equals_an_undisturbed_run(tmp_path):
    """A head and two simulated GPU nodes, the stand-in predictor. Once rows are committed, a
    worker node is removed (and another joins), then a node agent, a predictor actor and a read
    task are killed; in another run a node is drained, then removed at its deadline. Both
    outputs equal the undisturbed run's, row by row, each file reported once."""
    result = cluster_job("chaos", str(tmp_path))
    ref, chaos, drain = result["reference"], result["chaos"], result["drain"]
    assert ref["samples"] == result["rows"] == 480 and ref["errors"] == 0
    assert ref["units"] >= 120 and ref["placement"]["leases"] >= 4
    # The undisturbed run stayed on its nodes: nothing crossed between them.
    assert ref["placement"]["cross_node_unit_bytes_fraction"] == 0.0
    assert ref["placement"]["cross_node_row_bytes_fraction"] == 0.0
    # Both nodes got work, evenly: 12 files of 8 leases, no node a quarter or less.
    assert len(ref["receipt_nodes"]) == 2 and min(ref["receipt_nodes"].values()) > 3, ref
    for run in (chaos, drain):
        assert run["identical"], run
        assert (run["duplicates"], run["missing"], run["errors"]) == (0, 0, 0), run
        assert run["samples"] == 480 and run["receipt_files"] == ref["receipt_files"], run
    kills = chaos["during"]["kills"]
    assert kills["node"] == kills["node_agent"] == kills["predictor"] == 1, kills
    assert kills["read_task"] == 1, kills
    assert chaos["placement"]["agents_lost"] >= 2 and chaos["placement"]["leases_lost"] >= 1
    # The node that joined mid-run got work and committed files.
    assert set(chaos["during"]["added"]) & set(chaos["receipt_nodes"]), chaos
    assert drain["during"]["drained"] and drain["during"]["removed"], drain
    assert drain["placement"]["nodes_drained"] == 1, drain["placement"]
