"""jobs/benchmark.py end to end on the CPU, on a tiny archive."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "jobs" / "benchmark.py"


def _load_benchmark():
    # Left out of sys.modules on purpose: Ray then pickles the recipe's model class by value,
    # as it does when the script runs as __main__.
    spec = importlib.util.spec_from_file_location("landmarks_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_measures_the_three_configurations(ray_session, tmp_path):
    images, shards = 4, 2
    argv = [
        "--device",
        "cpu",
        "--images",
        str(images),
        "--image-size",
        "160x120",
        "--per-shard",
        "2",
        "--batch-size",
        "2",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--decode",
        "cpu,gpu",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "results"),
    ]
    started = time.perf_counter()
    _load_benchmark().main(argv)
    wall = time.perf_counter() - started

    result = json.loads((tmp_path / "results" / "benchmark.json").read_text())
    assert result["device"] == "cpu" and result["batch_size"] == 2 and not result["compile"]
    assert list(result["pipelines"]) == ["cpu", "gpu"]
    assert result["pipelines"]["cpu"] == result["pipeline"]
    read = result["read_stage_per_core"]
    assert read["cpu"]["images"] == read["gpu"]["images"] == images
    gpu_decode = result["pipelines"]["gpu"]  # on a CPU machine the CPU actor decodes
    assert gpu_decode["plan"]["decode"] == "gpu" and not gpu_decode["plan"]["use_gpu"]
    assert gpu_decode["images"] == images and gpu_decode["errors"] == 0
    assert gpu_decode["faces"] == gpu_decode["no_face"] == 0  # sidecar boxes: no detection
    # Every JPEG decoded by the predictor's (CPU) device decoder; the CPU-decode run none.
    assert (gpu_decode["device_decoded"], gpu_decode["cpu_fallbacks"]) == (images, {})
    assert result["pipelines"]["cpu"]["device_decoded"] == 0
    assert result["precision"] == "fp32"
    assert result["ratios"]["pipeline_gpu_over_model"] == pytest.approx(
        gpu_decode["images_per_s"] / result["model_alone"]["images_per_s"])
    assert result["images"] == images and result["shards"] == shards
    model, pipe, base = result["model_alone"], result["pipeline"], result["baseline"]
    assert model["images"] == 2  # one timed step of one batch
    detector = result["detector_alone"]  # one timed chunk of synthetic faces, as the predictor's
    assert detector["images"] == detector["chunk"] == 32 and result["detect"] == "auto"
    assert 16 <= detector["faces_found"] <= 32  # cartoon faces: the detector finds most
    assert result["detection_adds"] == pytest.approx(
        model["images_per_s"] / detector["images_per_s"])
    assert pipe["images"] == images and pipe["errors"] == 0
    assert base["images"] == images
    for figures in (model, detector, pipe, base):
        assert figures["images_per_s"] == pytest.approx(figures["images"] / figures["seconds"])
        assert figures["images_per_s"] > 0
    for figures in (pipe, base):
        assert 0 < figures["first_result_s"] <= figures["seconds"]

    expected = {
        "pipeline_over_model": pipe["images_per_s"] / model["images_per_s"],
        "pipeline_over_baseline": pipe["images_per_s"] / base["images_per_s"],
    }
    if "steady_images_per_s" in pipe:  # absent when every shard was committed at once
        steady = pipe["steady_images_per_s"]
        expected["steady_pipeline_over_model"] = steady / model["images_per_s"]
        expected["steady_pipeline_over_baseline"] = steady / base.get(
            "steady_images_per_s", base["images_per_s"]
        )
    assert {k: v for k, v in result["ratios"].items() if "_gpu_" not in k} == pytest.approx(
        expected)

    work = tmp_path / "work"  # kept, since it was given: shards, loose JPEGs, one file a shard
    assert len(list((work / "shards").glob("*.tar"))) == shards
    assert len(list((work / "jpegs").glob("*.jpg"))) == images
    # Checked against what the JSON cannot vouch for itself: the outputs on disk and a clock
    # outside the benchmark.
    outputs = {}
    for decode in ("cpu", "gpu"):
        files = sorted((work / f"landmarks-{decode}").glob("part-*.parquet"))
        assert len(files) == shards
        table = pa.concat_tables(pq.read_table(f) for f in files)
        assert table.num_rows == images and table.column("error").null_count == images
        outputs[decode] = table
    assert outputs["cpu"].column("key").to_pylist() == outputs["gpu"].column("key").to_pylist()
    np.testing.assert_allclose(  # the same libjpeg-turbo decode on both paths, on a CPU
        np.asarray(outputs["cpu"].column("landmarks").to_pylist()),
        np.asarray(outputs["gpu"].column("landmarks").to_pylist()), atol=0.5)
    timed = model["seconds"] + detector["seconds"] + base["seconds"] + sum(
        p["seconds"] for p in result["pipelines"].values())
    assert 0 < timed <= wall + 0.1  # (the benchmark's own clock and rounding: ~ms)


def _load_scale_benchmark():
    path = SCRIPT.parent / "benchmark_scale.py"
    spec = importlib.util.spec_from_file_location("landmarks_benchmark_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_benchmark_stand_in_feeds_the_real_commit_stage(tmp_path):
    """Without Ray: the benchmark's input goes through the real reader, its stand-in predictor
    holds a unit for rows / rate seconds and returns rows the real commit stage writes."""
    import time

    import pyarrow.parquet as pq

    from pipeline.io.shards import list_shards
    from pipeline.stages.commit import PieceSpec, commit_piece
    from pipeline.stages.reader import ReaderSettings, ShardReader
    from pipeline.stages.units import ReadTask, ShardTask

    bench = _load_scale_benchmark()
    assert bench.make_shards(tmp_path / "in", 2, 5) == 10
    shards = list_shards(str(tmp_path / "in"))
    ((header, rows),) = list(ShardReader(ReaderSettings(decode="gpu", unit_rows=100)).read_task(
        ReadTask(0, tuple(ShardTask(s) for s in shards))))
    predictor = bench.stand_in(200.0)()
    started = time.perf_counter()
    out = predictor(rows)
    assert time.perf_counter() - started >= 10 / 200.0
    assert out["landmarks"].shape == (10, 68, 2) and "encoded" not in out
    spec = PieceSpec(str(tmp_path / "out"), shards[0], 0, 0, True, "v", "s")
    receipt = commit_piece(spec, {k: v[:5] for k, v in out.items()})
    assert receipt["rows"] == 5 and receipt["errors"] == 0
    table = pq.read_table(tmp_path / "out" / receipt["file"])
    assert table.column("key").to_pylist() == [f"s00000-{i:06d}" for i in range(5)]
    # The steady window runs from the commit that passes 10 % of the rows to the one at 90 %.
    commits = [(float(t), 10) for t in range(10)]
    assert bench._steady_window(commits, 100) == (0.0, 8.0, 80)
    assert bench._tail_s(commits, 100) == 1.0  # from 90 % of the rows to the last commit
    # The chaos comparison: a hash of every row of every file, and the keys.
    digest = bench.output_digest(tmp_path / "out")
    assert list(digest) == [receipt["file"]] and len(digest[receipt["file"]]) == 5
    assert bench.output_keys(tmp_path / "out") == [f"s00000-{i:06d}" for i in range(5)]
    commit_piece(spec, {k: v[1:6] for k, v in out.items()})  # other rows, same file name
    assert bench.output_digest(tmp_path / "out") != digest


def test_detector_benchmark_reports_each_image(tmp_path):
    """jobs/benchmark_detect.py on the CPU, one repeat: faces found per image, times and shares
    that add up."""
    spec = importlib.util.spec_from_file_location("benchmark_detect",
                                                  SCRIPT.parent / "benchmark_detect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "detect.json"
    started = time.perf_counter()
    report = module.main(["--repeats", "1", "--out", str(out)])
    wall = time.perf_counter() - started
    assert json.loads(out.read_text()) == report and report["device"] == "cpu"
    rows = report["images"]
    assert [r["faces"] for r in rows.values()] == [1, 2, 1]
    for r in rows.values():
        assert 0 < r["detect_s"] < wall and 0 < r["landmarks_s"] < wall
        assert r["detect_share"] == pytest.approx(
            r["detect_s"] / (r["detect_s"] + r["landmarks_s"]), abs=2e-3)
        assert r["detect_images_per_s"] == pytest.approx(1 / r["detect_s"], rel=0.01)


def test_peer_benchmark_quick_gives_equal_outputs(tmp_path):
    """jobs/benchmark_peer.py --quick: the project and the Ray Data recipe, each as its own
    driver on one Ray node, over the same shards; both outputs hold every key once with the
    same landmarks (its speed figures are reported, not asserted)."""
    import subprocess
    import sys

    script = SCRIPT.parent / "benchmark_peer.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "peer.json").read_text())
    assert result["rows"] == 8 * 40
    assert [r["side"] for r in result["runs"]] == ["project", "recipe"]
    for run in result["runs"]:
        assert run["rows"] == result["rows"], run
        assert run["predictor_calls"] >= result["rows"] // 64, run
        assert run["files"] >= 1 and run["first_file_s"] > 0 and run["driver_peak_mb"] > 0, run
    ((check,),) = [result["checks"]]
    assert check == {"setting": "local", "unit_rows": 64, "pair": 0, "rows": 320,
                     "recipe_rows": 320, "same_keys": True, "duplicate_keys": 0,
                     "max_abs_diff": 0.0, "outputs_equal": True}
    assert result["outputs_equal"] is True
    assert {r["setting"] for r in result["ratios"]} == {"local"}
    assert "outputs equal: local/64/0: True" in proc.stdout


def test_peer_benchmark_keeps_a_stopped_run_and_sizes_real_object_stores():
    """Without Ray: a run stopped at its time limit keeps the rows that went through the
    predictor, with no driver figures and its pair marked in the ratios; simulated nodes get
    Ray's default object store share, not ray.cluster_utils' 150 MiB."""
    import importlib.util
    import sys

    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("landmarks_peer", SCRIPT.parent /
                                                  "benchmark_peer.py")
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    calls = [(float(t), 100) for t in range(10)]  # 1,000 rows at 100 rows/s
    run = peer.timed_out_run("recipe", calls, 60.0, 4_800)
    assert (run["rows"], run["rows_expected"], run["timed_out"]) == (1_000, 4_800, True)
    assert run["steady_rows_per_s"] == 100.0 and run["overall_rows_per_s"] == round(1000 / 60, 1)
    assert run["driver_cpu_s_per_million_rows"] is None and run["first_file_s"] is None
    done = {"side": "project", "timed_out": False, **{f: 200.0 for f in peer.FIGURES}}
    runs = [{"setting": "local", "unit_rows": 1024, **done},
            {"setting": "local", "unit_rows": 1024, **run}]
    (entry,) = peer.ratios(runs)
    assert entry["timed_out"] == ["recipe"]
    assert entry["steady_rows_per_s"]["ratio"] == 2.0
    assert entry["driver_peak_mb"] == {"project": 200.0, "recipe": None, "ratio": None}
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    store = peer.scale.object_store_bytes(3)
    assert 1024 * 224 * 224 * 3 < store <= 0.3 * memory / 3  # a 1,024-row unit fits
