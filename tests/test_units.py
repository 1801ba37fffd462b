"""Work units without Ray: pieces and units from the reader, their assembly, the commit stage,
resume from completion records, and the manifest parts."""

from __future__ import annotations

import io
import json
import random
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.helpers import tar_members, write_tar

from pipeline.demo.synthetic import write_sample_archive
from pipeline.io import resume
from pipeline.io.output import piece_stem, split_stem
from pipeline.io.report import ManifestWriter, Summary, read_receipts, write_manifest
from pipeline.io.resume import completed_pieces, settings_id
from pipeline.io.shards import Shard, list_shards
from pipeline.stages.commit import PieceSpec, commit_piece, gather
from pipeline.stages.reader import Beat, ReaderSettings, ShardReader
from pipeline.stages.units import (
    PieceAssembler,
    ReadTask,
    ShardTask,
    UnitBuilder,
    plan_read_tasks,
    slice_tasks,
)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    write_sample_archive(str(root), num_shards=1, samples_per_shard=7, seed=11,
                         image_size=(64, 48))
    return sorted(tar_members(root / "faces-00000.tar").items())


def _shards(tmp_path, faces, sizes: list[int]) -> list[Shard]:
    """Tar shards s0, s1, ... with ``sizes[i]`` samples each (taken from ``faces``)."""
    for i, n in enumerate(sizes):
        write_tar(tmp_path / f"s{i}.tar", faces[: 2 * n])
    return list_shards(str(tmp_path))


def _read(task: ReadTask, **kw):
    reader = ShardReader(ReaderSettings(**{"unit_rows": 4, **kw}))
    return list(reader.read_task(task))


def test_names_of_pieces():
    assert piece_stem("faces-00001", 0) == "faces-00001"
    assert piece_stem("faces-00001", 3) == "faces-00001.c00003"
    names = {"a", "a.b"}
    assert split_stem("a", names) == ("a", 0)
    assert split_stem("a.c00012", names) == ("a", 12)
    assert split_stem("a.b.c00001", names) == ("a.b", 1)
    assert split_stem("z.c00001", names) is None and split_stem("a.c1", names) is None


def test_a_shard_named_like_a_later_piece_is_refused(tmp_path):
    write_tar(tmp_path / "x.tar", [])
    write_tar(tmp_path / "x.c00001.tar", [])
    with pytest.raises(ValueError, match=r"part-x\.c00001\.parquet, the name of a later piece"):
        list_shards(str(tmp_path))


def test_builder_cuts_pieces_at_multiples_of_rows_per_file():
    builder = UnitBuilder(task=5, rows_per_file=3, unit_rows=4, unit_bytes=1 << 30)
    full = [builder.add(0, row, row == 6, 10) for row in range(4)]  # a shard of 7 rows
    assert full == [False, False, False, True]  # 4 rows: the unit is full
    first = builder.flush()
    for row in range(4, 7):
        builder.add(0, row, row == 6, 10)
    second = builder.flush()
    assert [(s.piece, s.start, s.stop, s.first_row, s.ends, s.last) for s in first.segments] == [
        (0, 0, 3, 0, True, False), (1, 3, 4, 0, False, False)]
    assert [(s.piece, s.start, s.stop, s.first_row, s.ends, s.last) for s in second.segments] \
        == [(1, 0, 2, 1, True, False), (2, 2, 3, 0, True, True)]
    assert (first.task, first.index, first.rows, first.bytes) == (5, 0, 4, 40)
    assert (second.index, second.rows) == (1, 3) and not builder.pending()


def test_reader_bundles_small_shards_into_full_units(tmp_path, faces):
    shards = _shards(tmp_path, faces, [1, 2, 1, 3, 2])
    units = _read(ReadTask(0, tuple(ShardTask(s) for s in shards)), unit_rows=4)
    assert [h.rows for h, _ in units] == [4, 4, 1]  # 9 rows: full units, then the tail
    (h0, r0), (h1, r1), _ = units
    assert [(s.shard, s.piece, s.start, s.stop, s.ends, s.last) for s in h0.segments] == [
        (0, 0, 0, 1, True, True), (1, 0, 1, 3, True, True), (2, 0, 3, 4, True, True)]
    # Shard 3 (3 rows) straddles the first two units: its piece ends in the second.
    assert [(s.shard, s.start, s.stop, s.first_row, s.ends) for s in h1.segments] == [
        (3, 0, 3, 0, True), (4, 3, 4, 0, False)]
    assert r0["shard"].tolist() == [shards[0].uri] + [shards[1].uri] * 2 + [shards[2].uri]
    assert r0["pixels"].shape == (4, 224, 224, 3) and r0["pixels"].std() > 10


def test_reader_splits_a_big_shard_and_skips_done_pieces(tmp_path, faces):
    (shard,) = _shards(tmp_path, faces, [7])
    units = _read(ReadTask(0, (ShardTask(shard),)), unit_rows=2, rows_per_file=3)
    keys = np.concatenate([r["key"] for _, r in units]).tolist()
    assert keys == [f"face-00000-{i:05d}" for i in range(7)]
    segments = [s for h, _ in units for s in h.segments]
    assert {(s.piece, s.ends, s.last) for s in segments if s.ends} == {
        (0, True, False), (1, True, False), (2, True, True)}

    # Pieces 0 and 2 were committed before: only piece 1's rows are read into units, undecoded
    # rows are not sent on, and row numbers stay those of the whole shard.
    units = _read(ReadTask(0, (ShardTask(shard, frozenset({0, 2})),)), unit_rows=8,
                  rows_per_file=3)
    ((header, rows),) = units
    assert rows["key"].tolist() == [f"face-00000-{i:05d}" for i in (3, 4, 5)]
    assert [(s.piece, s.first_row, s.ends, s.last) for s in header.segments] == [
        (1, 0, True, False)]


def test_a_shard_that_breaks_in_a_done_piece_reports_in_the_next_piece(tmp_path, faces):
    path = write_tar(tmp_path / "t.tar", faces)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"face-00000-00002.jpg") + 600])  # cut in row 2
    (shard,) = list_shards(str(tmp_path))
    ((header, rows),) = _read(ReadTask(0, (ShardTask(shard, frozenset({0})),)), unit_rows=8,
                              rows_per_file=3)
    assert rows["key"].tolist() == [""] and rows["error_kind"].tolist() == ["shard_error"]
    assert rows["error"][0].startswith("shard error after 2 samples")
    assert [(s.piece, s.first_row, s.ends, s.last) for s in header.segments] == [
        (1, 0, True, True)]


def test_an_empty_shard_still_gets_its_piece(tmp_path):
    write_tar(tmp_path / "empty.tar", [])
    (shard,) = list_shards(str(tmp_path))
    ((header, rows),) = _read(ReadTask(0, (ShardTask(shard),)))
    assert header.rows == 0 and len(rows["key"]) == 0
    assert [(s.piece, s.start, s.stop, s.ends, s.last) for s in header.segments] == [
        (0, 0, 0, True, True)]
    (ready,) = PieceAssembler().add(header, "unit")
    assert (ready.piece, ready.last, ready.parts) == (0, True, [("unit", (0, 0))])


def test_units_cut_at_their_byte_limit(tmp_path, faces):
    shards = _shards(tmp_path, faces, [3, 3])
    pixels = 224 * 224 * 3
    units = _read(ReadTask(0, tuple(ShardTask(s) for s in shards)), unit_rows=100,
                  unit_bytes=2 * pixels)
    assert [h.rows for h, _ in units] == [2, 2, 2]
    assert [h.bytes for h, _ in units] == [2 * pixels] * 3


def test_assembler_completes_pieces_from_units_in_any_order(tmp_path, faces):
    (shard,) = _shards(tmp_path, faces, [7])
    units = _read(ReadTask(3, (ShardTask(shard),)), unit_rows=2, rows_per_file=5)
    assert len(units) == 4
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        assembler, ready = PieceAssembler(), []
        for i in order:
            ready += assembler.add(units[i][0], i)
        assert not assembler.open
        by_piece = {p.piece: p for p in ready}
        assert sorted(by_piece) == [0, 1] and by_piece[1].last and not by_piece[0].last
        rows = gather([units[u][1] for u, _ in by_piece[0].parts],
                      [r for _, r in by_piece[0].parts])
        assert rows["key"].tolist() == [f"face-00000-{i:05d}" for i in range(5)]
        assert {p.task for p in ready} == {3}


def test_plan_read_tasks_by_bytes_count_and_cluster_size():
    shards = [ShardTask(Shard(f"s{i}", f"/s{i}", "tar", size=size))
              for i, size in enumerate([10, 10, 10, 50, 10, 10])]
    tasks = plan_read_tasks(shards, task_bytes=25)
    assert [[t.shard.name for t in task.shards] for task in tasks] == [
        ["s0", "s1"], ["s2"], ["s3"], ["s4", "s5"]]
    assert [t.index for t in tasks] == [0, 1, 2, 3] and tasks[0].bytes == 20
    assert [len(t.shards) for t in plan_read_tasks(shards, task_bytes=1000, task_shards=4)] \
        == [4, 2]
    # Little data, many read slots: smaller tasks so the slots all get work.
    assert len(plan_read_tasks(shards, task_bytes=1000, min_tasks=4)) >= 4


def test_slice_tasks_fill_the_read_lanes_with_slices_of_big_shards():
    big = ShardTask(Shard("big", "/big", "tar", size=900))
    small = [ShardTask(Shard(f"s{i}", f"/s{i}", "tar", size=10)) for i in range(2)]
    tasks = [ReadTask(0, (big,)), ReadTask(1, tuple(small))]
    rows = {"big": 1000, "s0": 5, "s1": 5}
    out = slice_tasks(tasks, lanes=4, rows_of=lambda s: rows[s.name], min_rows=100)
    # The 2 spare lanes go to the one big shard: 3 slices of it, the last to the shard's end;
    # with the task of small shards, 4 tasks for 4 lanes.
    assert [t.shards[0].rows for t in out[:3]] == [(0, 334), (334, 668), (668, None)]
    assert out[3].shards == tuple(small) and [t.index for t in out] == [0, 1, 2, 3]
    assert {t.shards[0].shard.name for t in out[:3]} == {"big"}
    # Enough tasks, no estimate, or too few rows for two slices: nothing is cut.
    assert slice_tasks(tasks, 2, lambda s: rows[s.name], 100) == tasks
    assert slice_tasks(tasks, 4, lambda s: None, 100) == tasks
    assert slice_tasks(tasks, 4, lambda s: 150, 100) == tasks
    assert len(slice_tasks(tasks, 4, lambda s: 250, 100)) == 3  # two slices of >= 100 rows
    assert len(slice_tasks(tasks, 8, lambda s: 1000, 100)) == 8  # 7 slices + the small task


def _assembled(units: list, shard_key=None) -> dict[int, tuple[bool, list, list]]:
    """piece -> (last, keys, error kinds) from predicted units (here: the read units)."""
    assembler, out = PieceAssembler(), {}
    for i, (header, _) in enumerate(units):
        for piece in assembler.add(header, i, shard_key):
            rows = gather([units[u][1] for u, _ in piece.parts], [r for _, r in piece.parts])
            assert piece.piece not in out, "a piece completed twice"
            out[piece.piece] = (piece.last, rows["key"].tolist(), rows["error_kind"].tolist())
    assert not assembler.open, "a piece never got all its rows"
    return out


@pytest.mark.parametrize("damaged", [False, True], ids=["whole", "truncated"])
def test_slices_of_a_shard_give_the_same_pieces_as_one_read(tmp_path, faces, damaged):
    # 8 rows (one a duplicate key), pieces of 3 rows: slice cuts fall inside pieces.
    path = write_tar(tmp_path / "s.tar", faces[:14] + faces[2:4])
    if damaged:  # cut in the middle of a member: the shard ends with its error row
        path.write_bytes(path.read_bytes()[: 7 * 1024])
    (shard,) = list_shards(str(tmp_path))
    kw = dict(rows_per_file=3, unit_rows=2)
    whole = _assembled(_read(ReadTask(0, (ShardTask(shard),)), **kw))
    kinds = [k for _, (_, _, ks) in sorted(whole.items()) for k in ks]
    assert ("shard_error" in kinds) == damaged and ("duplicate_key" in kinds) != damaged
    for skip in (frozenset(), frozenset({1})):
        expected = {p: v for p, v in whole.items() if p not in skip} if skip else whole
        if skip:
            expected = _assembled(_read(ReadTask(0, (ShardTask(shard, skip),)), **kw))
        for cuts in ([(0, 3), (3, 5), (5, None)], [(0, 1), (1, 7), (7, None)],
                     [(0, 4), (4, 20), (20, None)], [(0, 2), (2, None)]):
            units = [u for k, rows in enumerate(cuts)
                     for u in _read(ReadTask(k, (ShardTask(shard, skip, rows),)), **kw)]
            assert _assembled(units, lambda i: "s") == expected, (skip, cuts)


def test_an_empty_shard_sliced_still_gets_one_piece(tmp_path):
    write_tar(tmp_path / "empty.tar", [])
    (shard,) = list_shards(str(tmp_path))
    units = [u for k, rows in enumerate([(0, 5), (5, None)])
             for u in _read(ReadTask(k, (ShardTask(shard, rows=rows),)))]
    assert _assembled(units, lambda i: "e") == {0: (True, [], [])}


def test_estimate_rows_of_each_format(tmp_path, faces):
    from pipeline.io.shards import estimate_rows

    (tmp_path / "small").mkdir()
    (small,) = _shards(tmp_path / "small", faces, [7])
    assert estimate_rows(small) == 7  # the whole shard fits the probe: counted
    estimate = estimate_rows(small, probe_bytes=4096)  # scaled from the first members
    assert 7 / 3 <= estimate <= 7 * 3  # (an estimate: the slices need no exact count)
    images = Shard("g", "/g", "images", paths=("a.jpg", "b.jpg", "c.png"))
    assert estimate_rows(images) == 3
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    assert estimate_rows(Shard("j", str(junk), "tar", paths=(str(junk),), size=1600)) is None


def _predicted(keys: list[str], errors: dict[int, str] | None = None) -> dict:
    n = len(keys)
    rows = {
        "key": np.asarray(keys, dtype=object), "shard": np.full(n, "/in/a.tar", dtype=object),
        "width": np.full(n, 64, np.int32), "height": np.full(n, 48, np.int32),
        "bbox": np.full((n, 4), np.nan, np.float32), "crop": np.tile([0.0, -8.0, 64.0], (n, 1)),
        "face": np.zeros(n, np.int16), "face_score": np.full(n, np.nan, np.float32),
        "face_box": np.full((n, 4), np.nan, np.float32),
        "face_points": np.full((n, 5, 2), np.nan, np.float32),
        "meta": np.full(n, "", dtype=object), "error": np.full(n, "", dtype=object),
        "error_kind": np.full(n, "", dtype=object),
        "landmarks": np.random.default_rng(0).uniform(0, 60, (n, 68, 2)).astype(np.float32),
        "model_version": np.full(n, "v1", dtype=object),
    }
    for i, kind in (errors or {}).items():
        rows["error"][i], rows["error_kind"][i] = f"{kind} error", kind
        rows["landmarks"][i] = np.nan
    return rows


def _spec(tmp_path, shard, piece=0, last=True, **kw) -> PieceSpec:
    return PieceSpec(str(tmp_path / "out"), shard, piece, piece * 10, last, "v1", "settings-a",
                     **kw)


def test_commit_writes_the_file_then_its_record_and_returns_a_receipt(tmp_path):
    shard = Shard("a", "/in/a.tar", "tar", ("/in/a.tar",), fingerprint="100:abc", size=100)
    units = [_predicted(["k0", "k1", "k2"]), _predicted(["k3", "k4"], {1: "decode"})]
    rows = gather(units, [(1, 3), (0, 2)])
    receipt = commit_piece(_spec(tmp_path, shard, piece=2), rows)
    out = tmp_path / "out"
    table = pq.read_table(out / "part-a.c00002.parquet")
    assert table.column("key").to_pylist() == ["k1", "k2", "k3", "k4"]
    assert table.column("error_kind").to_pylist() == [None, None, None, "decode"]
    record = json.loads((out / "_done" / "a.c00002.json").read_text())
    assert {k: record[k] for k in ("shard", "shard_fingerprint", "file", "piece", "first_row",
                                   "last", "rows", "errors", "complete", "model_version")} == {
        "shard": "/in/a.tar", "shard_fingerprint": "100:abc", "file": "part-a.c00002.parquet",
        "piece": 2, "first_row": 20, "last": True, "rows": 4, "errors": 1, "complete": True,
        "model_version": "v1"}
    assert {k: receipt[k] for k in ("file", "shard", "piece", "rows", "errors",
                                    "errors_by_kind", "shard_failed")} == {
        "file": "part-a.c00002.parquet", "shard": "a", "piece": 2, "rows": 4, "errors": 1,
        "errors_by_kind": {"decode": 1}, "shard_failed": False}
    assert receipt["bytes"] == (out / "part-a.c00002.parquet").stat().st_size
    # A shard-level error row (no key) marks the piece incomplete, so a rerun redoes it.
    failed = commit_piece(_spec(tmp_path, shard), gather(
        [_predicted(["k0", ""], {1: "storage"})], [(0, 2)]))
    assert failed["shard_failed"]
    assert json.loads((out / "_done" / "a.json").read_text())["complete"] is False


def test_commit_killed_between_data_and_record_leaves_no_record(tmp_path):
    """The fault hook fires after the data file is committed: a process dies there (tested
    for real in test_recovery.py); here the hook raises instead to show where it sits."""
    shard = Shard("a", "/in/a.tar", "tar", ("/in/a.tar",))
    spec = _spec(tmp_path, shard, faults="dir=/nonexistent-dir;commit=a")
    with pytest.raises(OSError):  # the marker cannot be created: the hook ran, then stopped
        commit_piece(spec, _predicted(["k0"]))
    assert (tmp_path / "out" / "part-a.parquet").exists()
    assert not (tmp_path / "out" / "_done").exists()


def _done_output(tmp_path, shard: Shard, pieces: dict[int, dict]) -> str:
    out = tmp_path / "out"
    for piece, over in pieces.items():
        stem = piece_stem(shard.name, piece)
        (out / "_done").mkdir(parents=True, exist_ok=True)
        (out / f"part-{stem}.parquet").write_bytes(b"x")
        record = {"shard": shard.uri, "shard_fingerprint": shard.fingerprint, "piece": piece,
                  "last": False, "rows": 10, "errors": 1, "complete": True,
                  "model_version": "v1", "settings": "s", **over}
        (out / "_done" / f"{stem}.json").write_text(json.dumps(record))
    return str(out)


def test_resume_knows_finished_and_partly_done_shards(tmp_path):
    a = Shard("a", "/in/a.tar", "tar", fingerprint="1:x")
    b = Shard("b", "/in/b.tar", "tar", fingerprint="1:y")
    out = _done_output(tmp_path, a, {0: {}, 1: {"last": True}})
    _done_output(tmp_path, b, {0: {}, 2: {"last": True}, 3: {"model_version": "v0"}})
    done = completed_pieces(out, [a, b], "v1", "s")
    assert done["a"].finished and done["a"].pieces == {0, 1} and done["a"].rows == 20
    assert not done["b"].finished and done["b"].pieces == {0, 2}  # piece 1 is missing
    assert completed_pieces(out, [a], "v2", "s") == {}  # another model: nothing is done
    assert completed_pieces(out, [a], "v1", "other") == {}
    changed = Shard("a", "/in/a.tar", "tar", fingerprint="2:z")  # the input changed
    assert completed_pieces(out, [changed], "v1", "s") == {}
    (tmp_path / "out" / "part-a.c00001.parquet").unlink()  # a data file gone: redo that piece
    assert completed_pieces(out, [a], "v1", "s")["a"].pieces == {0}
    # An incomplete piece (the read stopped there) is not done either.
    c = Shard("c", "/in/c.tar", "tar", fingerprint="1:c")
    _done_output(tmp_path, c, {0: {"last": True, "complete": False}})
    assert "c" not in completed_pieces(out, [c], "v1", "s")


def test_resume_reads_records_in_batches_each_retried_on_its_own(tmp_path, monkeypatch):
    shards = [Shard(f"s{i:03d}", f"/in/s{i:03d}.tar", "tar", fingerprint="1:x")
              for i in range(50)]
    for shard in shards:
        out = _done_output(tmp_path, shard, {0: {"last": True}})
    monkeypatch.setattr(resume, "RECORD_BATCH", 8)
    monkeypatch.setattr("pipeline.io.storage.BACKOFF_S", 0.0)
    import fsspec.implementations.local as local

    calls, failed = [], []
    original = local.LocalFileSystem.cat

    def flaky_cat(self, paths, *args, **kw):
        calls.append(len(paths))
        if len(calls) == 3 and not failed:  # one batch's request drops once
            failed.append(1)
            raise ConnectionResetError("connection reset by peer")
        return original(self, paths, *args, **kw)

    monkeypatch.setattr(local.LocalFileSystem, "cat", flaky_cat)
    done = completed_pieces(out, shards, "v1", "s")
    assert len(done) == 50 and all(p.finished for p in done.values())
    assert failed and max(calls) == 8 and sum(calls) == 50 + 8  # only that batch again


def test_manifest_parts_hold_every_receipt_and_the_summary_stays_small(tmp_path):
    out = str(tmp_path / "out")
    writer = ManifestWriter(out, "run-1", part_receipts=3, part_seconds=3600)
    summary = Summary(5, 0, 0, 1.0, "v1", out, [])
    receipts = [{"file": f"part-s{i}.parquet", "shard": f"s{i}", "piece": 0, "rows": i,
                 "errors": i % 2, "errors_by_kind": {"decode": i % 2} if i % 2 else {},
                 "shard_failed": i == 4, "bytes": 100, "cpu_s": 0.5} for i in range(7)]
    random.Random(0).shuffle(receipts)
    for r in receipts:
        summary.add(r)
        writer.add(r)
    assert len(writer.parts) == 2 and len(writer.buffer) == 1  # parts written as they fill
    write_manifest({"input": "x"}, summary, writer, "2026-11-27T00:00:00+00:00")
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["receipts"] == [f"_manifest/run-1/part-0000{i}.jsonl" for i in range(3)]
    assert (manifest["files"], manifest["samples"], manifest["errors"]) == (7, 21, 3)
    assert manifest["errors_by_kind"] == {"decode": 3} and manifest["failed_shards"] == ["s4"]
    assert manifest["commit_cpu_s"] == 3.5 and manifest["output_bytes"] == 700
    assert read_receipts(out) == receipts
    assert settings_id({"a": 1}) != settings_id({"a": 2})


def test_a_full_run_retires_outputs_the_input_no_longer_produces(tmp_path):
    """Files of a deleted input shard, and later pieces a shard's new layout does not have, move
    to _retired/<run>/ with their records; files from elsewhere, and a failed shard's, stay."""
    from pipeline.io.resume import RETIRED_DIR, retire_stale_outputs, write_completion_record

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b", "c"):
        write_tar(src / f"{name}.tar", [(f"{name}.jpg", b"x")])
    out = tmp_path / "out"
    before = {s.name: s for s in list_shards(str(src))}

    def commit(shard, piece, model="m1", stem=None):
        stem = stem or piece_stem(shard.name, piece)
        (out / f"part-{stem}.parquet").write_bytes(b"rows")
        write_completion_record(str(out), shard, stem, piece, piece * 10, False, 1, 0, False,
                                model, "s1")

    out.mkdir()
    for shard in before.values():
        commit(shard, 0)
    commit(before["a"], 1)  # a later piece: a's input was bigger before
    elsewhere = Shard("z", "/elsewhere/z.tar", "tar", ("/elsewhere/z.tar",))
    commit(elsewhere, 0)  # written by a run over another input: not ours to judge
    (src / "b.tar").unlink()
    write_tar(src / "a.tar", [("a.jpg", b"xy")])  # a changed: its old piece 1 is stale
    shards = list_shards(str(src))
    for shard in shards:  # this run rewrote piece 0 of what is listed
        commit(shard, 0, model="m2")

    retired = retire_stale_outputs(str(out), str(src), shards, "m2", "s1", "run-7")
    assert sorted(retired) == ["a.c00001", "b"]
    assert sorted(p.name for p in out.glob("part-*")) == [
        "part-a.parquet", "part-c.parquet", "part-z.parquet"]
    moved = out / RETIRED_DIR / "run-7"
    assert sorted(p.name for p in moved.glob("part-*")) == [
        "part-a.c00001.parquet", "part-b.parquet"]
    assert sorted(p.name for p in (moved / "_done").iterdir()) == ["a.c00001.json", "b.json"]
    assert not (out / "_done" / "b.json").exists() and (out / "_done" / "z.json").exists()
    assert retire_stale_outputs(str(out), str(src), shards, "m2", "s1", "run-8") == []

    commit(shards[0], 1)  # a stale later piece of a shard that failed this run: left for later
    assert retire_stale_outputs(str(out), str(src), shards, "m2", "s1", "run-9",
                                failed={"a"}) == []
    assert retire_stale_outputs(str(out), f"{src}/*.tar", shards, "m2", "s1", "run-9") == [
        "a.c00001"]  # a glob input covers it too


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_error_rows_weigh_what_they_hold_so_units_stay_under_the_cap(tmp_path, decode):
    """30 empty members: 30 error rows. With --decode cpu each holds a zeroed 224x224x3 pixel
    array; they used to weigh 0 bytes, so they all went into one unit far above the cap."""
    from pipeline.model.geometry import INPUT_SIZE
    from pipeline.stages.commit import rows_nbytes
    from pipeline.stages.reader import ROW_BYTES

    with tarfile.open(tmp_path / "e.tar", "w") as tar:
        for i in range(30):
            tar.addfile(tarfile.TarInfo(f"e{i:02d}.jpg"), io.BytesIO(b""))
    row = INPUT_SIZE * INPUT_SIZE * 3 if decode == "cpu" else ROW_BYTES
    reader = ShardReader(ReaderSettings(unit_rows=1000, unit_bytes=10 * row, decode=decode))
    units = list(reader.read_task(ReadTask(0, (ShardTask(list_shards(str(tmp_path))[0]),))))
    assert sum(h.rows for h, _ in units) == 30
    assert [h.rows for h, _ in units] == [10, 10, 10]
    assert all(set(rows["error_kind"]) == {"empty"} for _, rows in units)
    if decode == "cpu":  # what a unit really carries stays within the cap
        assert all(rows_nbytes(rows) <= 10 * row + 10 * 4096 for _, rows in units)


def test_an_output_belongs_to_one_input_root_unless_forced(tmp_path):
    out = str(tmp_path / "out")
    (tmp_path / "out").mkdir()
    resume.claim_output(out, "s3://b/in", force=False)
    resume.claim_output(out, "s3://b/in", force=False)  # the same root: fine, every time
    with pytest.raises(ValueError, match="holds the results of the input s3://b/in, and this "
                                         "run reads s3://b/other"):
        resume.claim_output(out, "s3://b/other", force=False)
    resume.claim_output(out, "s3://b/other", force=True)  # taken over, and recorded
    assert json.loads((tmp_path / "out" / "_input.json").read_text()) == {
        "input_root": "s3://b/other"}
    write_sample_archive(str(tmp_path / "in"), num_shards=1, samples_per_shard=1,
                         image_size=(32, 32))
    shards = list_shards(str(tmp_path / "in") + "/*.tar")  # a glob: its folder is the root
    assert resume.input_root(shards) == str(tmp_path / "in")


def test_a_read_task_passing_over_done_pieces_beats_where_the_input_says(tmp_path):
    """A resumed shard whose done pieces take longer to stream past than --stall-timeout was
    stopped as stalled, rerun after rerun (issue 21): a read task asked for beats sends one
    for every ``beat_rows`` (or ``beat_bytes``) of input it passes over, at the same places
    on every attempt, and only the rows to do become units."""
    write_sample_archive(str(tmp_path), num_shards=1, samples_per_shard=7, image_size=(32, 32))
    shard = list_shards(str(tmp_path))[0]
    task = ReadTask(0, (ShardTask(shard, frozenset({0, 1})),))  # rows 0-3 are done
    reader = ShardReader(ReaderSettings(rows_per_file=2, unit_rows=32, beat_rows=2))
    items = list(reader.read_task(task, beats=True))
    beats = [item for item in items if isinstance(item, Beat)]
    assert [(b.row, b.rows) for b in beats] == [(1, 2), (3, 2)]
    assert all(b.bytes > 0 and b.shard == shard.name for b in beats)
    units = [item for item in items if not isinstance(item, Beat)]
    every_key = [k for _, rows in reader.read_task(ReadTask(0, (ShardTask(shard),)))
                 for k in rows["key"]]
    assert [k for _, rows in units for k in rows["key"]] == every_key[4:]
    again = [(b.row, b.rows, b.bytes) for b in reader.read_task(task, beats=True)
             if isinstance(b, Beat)]
    assert again == [(b.row, b.rows, b.bytes) for b in beats]  # a retry beats the same
    # By bytes: a beat for every byte passed over is one for every row.
    by_bytes = ShardReader(ReaderSettings(rows_per_file=2, beat_bytes=1))
    by_bytes = by_bytes.read_task(task, beats=True)
    assert [b.row for b in by_bytes if isinstance(b, Beat)] == [0, 1, 2, 3]
    assert not any(isinstance(i, Beat) for i in reader.read_task(task))  # off by default
