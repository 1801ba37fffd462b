"""The inference job end to end on a local Ray instance, read back with pyarrow."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support.browser import CHROMIUM, load_page
from support.helpers import normalize, real_photo, tar_members, write_tar
from support.prometheus_text import scrape, settled, wait_for

from pipeline.demo.synthetic import write_sample_archive
from pipeline.inference.config import InferConfig
from pipeline.inference.job import run_inference
from pipeline.io.rows import SCHEMA
from pipeline.io.shards import list_shards
from pipeline.stages.preprocess import preprocess, to_pixels

PHOTOS = {"photo-takeo": "takeo.ppm", "photo-breakingbad": "breakingbad.jpg"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Two synthetic shards of 3 faces, plus a mixed shard: a face, a corrupt JPEG, a key with
    only a text member, and the two real photos (PPM and a large JPEG) with face boxes."""
    root = tmp_path_factory.mktemp("archive")
    write_sample_archive(str(root), num_shards=2, samples_per_shard=3, seed=3,
                         image_size=(160, 120))
    face = tar_members(root / "faces-00000.tar")
    members = [("mixed-0.jpg", face["face-00000-00000.jpg"]),
               ("mixed-0.json", face["face-00000-00000.json"]),
               ("mixed-1.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10),
               ("mixed-2.txt", b"a caption without an image")]
    for key, name in PHOTOS.items():
        data, meta = real_photo(name)
        members += [(f"{key}.{name.rsplit('.', 1)[1]}", data),
                    (f"{key}.json", json.dumps(meta).encode())]
    write_tar(root / "mixed.tar", members)
    return root


def _job(archive, output, weights, **overrides):
    cfg = InferConfig(input=str(archive), output=str(output), weights=weights, batch_size=4,
                      **overrides)
    return run_inference(cfg)


@pytest.fixture(scope="module")
def result(ray_session, ray_metrics_url, archive, weights_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("out")
    before = settled(ray_metrics_url)  # earlier tests' jobs report their last figures late
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = _job(archive, output, weights_file[0])
    tables = {p.name: pq.read_table(p) for p in sorted(output.glob("*.parquet"))}
    # What this job added to the node's metrics, read once every figure the job knows of has
    # arrived (or the deadline passed: the test then shows what did).
    want = {("ray_landmarks_files_committed_total", ""): summary.files_committed,
            ("ray_landmarks_rows_committed_total", ""): sum(t.num_rows for t in tables.values()),
            ("ray_landmarks_samples_read_total", ""): summary.samples,
            ("ray_landmarks_predict_unit_seconds_count", ""): summary.predictor_calls,
            ("ray_landmarks_commit_seconds_count", ""): 1}
    after = wait_for(lambda: scrape(ray_metrics_url), lambda seen: all(
        seen[key] - before[key] >= n for key, n in want.items()))
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    return summary, output, tables, caught, {k: v for k, v in delta.items() if v}


def test_the_run_uses_no_deprecated_ray_api(result):
    from ray.util.annotations import RayDeprecationWarning

    deprecated = [str(w.message) for w in result[3]
                  if issubclass(w.category, RayDeprecationWarning)
                  or (issubclass(w.category, DeprecationWarning) and "ray" in w.filename)]
    assert deprecated == []


def test_the_job_s_counts_reach_prometheus(result, archive):
    """Scraped over HTTP from the Ray node's metrics port: what the job's counters added
    equals the job's own counts (rows, files, errors by kind) and its predictor calls."""
    summary, output, tables, _, delta = result
    rows = sum(t.num_rows for t in tables.values())
    counted = {name: value for (name, tag), value in delta.items() if not tag}
    assert counted["ray_landmarks_rows_committed_total"] == rows == 11
    assert counted["ray_landmarks_files_committed_total"] == summary.files_committed == 3
    assert counted["ray_landmarks_samples_read_total"] == summary.samples
    assert counted["ray_landmarks_input_bytes_total"] == sum(  # every image member's bytes
        len(data) for path in archive.glob("*.tar") for name, data in tar_members(path).items()
        if name.rsplit(".", 1)[1] in ("jpg", "ppm"))
    assert counted["ray_landmarks_rows_predicted_total"] == rows
    assert counted["ray_landmarks_bytes_written_total"] == sum(
        p.stat().st_size for p in output.glob("part-*.parquet"))
    assert {tag: v for (name, tag), v in delta.items()
            if name == "ray_landmarks_errors_total"} == summary.errors_by_kind
    assert sum(summary.errors_by_kind.values()) == summary.errors == 2
    assert counted["ray_landmarks_predict_unit_seconds_count"] == summary.predictor_calls
    assert counted["ray_landmarks_commit_seconds_count"] >= 1
    assert 0 < counted["ray_landmarks_predictor_busy_seconds_total"] <= summary.seconds


def _input_samples(archive):
    """key -> (image bytes, sidecar dict or None), straight from the tar files."""
    samples = {}
    for path in sorted(archive.glob("*.tar")):
        members = tar_members(path)
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext != "json":
                meta = members.get(f"{key}.json")
                samples[key] = (data, json.loads(meta) if meta else None)
    return samples


@pytest.mark.skipif(CHROMIUM is None, reason=(
    "chromium is not installed (Debian package chromium; .ci/run installs it)"))
def test_the_run_writes_its_report_and_the_command_rebuilds_it(result):
    from pipeline.cli.main import main

    summary, output = result[0], result[1]
    manifest = json.loads((output / "_manifest.json").read_text())
    page_file = output / "_report" / f"{manifest['run_id']}.html"
    assert summary.report == str(page_file)
    written = page_file.read_bytes()
    page = load_page(page_file, evaluate='document.querySelectorAll("img.preview").length')
    assert page.errors == [] and page.value == 1  # the preview of the first shard is there
    f = page.figures
    assert f["status"] == manifest["status"].upper() and f["model_version"] == summary.model_version
    for name in ("samples", "rows", "files", "errors", "shards"):
        assert int(f[name].replace(",", "")) == manifest[name], name
    assert manifest["errors_by_kind"] and {
        k: int(f[f"errors.{k}"]) for k in manifest["errors_by_kind"]} == manifest["errors_by_kind"]
    assert f["busy_fraction"] == f"{100 * manifest['predictor_busy_fraction']:.1f} %"
    assert 0 < manifest["predictor_busy_fraction"] <= 1
    assert float(f["cpu_s_per_million_rows"].replace(",", "")) == pytest.approx(
        manifest["cost"]["cpu_s_per_million_rows"], abs=0.05)
    assert manifest["cost"]["gpu_s"] == 0  # CPU predictors hold no GPU

    page_file.unlink()  # the command rebuilds the same page from the manifest and the files
    assert main(["report", str(output)]) == 0
    assert page_file.read_bytes() == written


def test_one_file_per_shard_one_row_per_sample(result, archive):
    summary, output, tables, *_ = result
    assert sorted(p.name for p in output.iterdir()) == [
        "_done", "_input.json", "_manifest", "_manifest.json", "_report",
        "part-faces-00000.parquet",
        "part-faces-00001.parquet",
        "part-mixed.parquet"]
    assert sorted(p.name for p in (output / "_done").iterdir()) == [
        "faces-00000.json", "faces-00001.json", "mixed.json"]
    done = json.loads((output / "_done" / "mixed.json").read_text())
    assert (done["file"], done["rows"], done["errors"]) == ("part-mixed.parquet", 5, 2)
    assert done["shard"] == str(archive / "mixed.tar")
    assert done["shard_fingerprint"].startswith(f"{(archive / 'mixed.tar').stat().st_size}:")
    assert [t.num_rows for t in tables.values()] == [3, 3, 5]
    assert tables["part-faces-00001.parquet"].column("key").to_pylist() == [
        f"face-00001-{i:05d}" for i in range(3)]
    assert tables["part-mixed.parquet"].column("key").to_pylist() == [
        "mixed-0", "mixed-1", "mixed-2", "photo-takeo", "photo-breakingbad"]
    for name, table in tables.items():
        assert table.schema.equals(SCHEMA), name
        stem = name.removeprefix("part-").removesuffix(".parquet")
        assert set(table.column("shard").to_pylist()) == {str(archive / f"{stem}.tar")}
        assert set(table.column("model_version").to_pylist()) == {summary.model_version}
    assert (summary.shards, summary.samples, summary.errors) == (3, 11, 2)
    manifest = json.loads((output / "_manifest.json").read_text())
    assert (manifest["samples"], manifest["errors"]) == (11, 2)


def test_landmarks_equal_a_direct_call_of_the_model(result, archive, weights_file):
    """Same weights, CPU, fp32: the Ray job's landmarks equal the model called in-process."""
    _, model, version = weights_file
    _, _, tables, *_ = result
    inputs = _input_samples(archive)
    rows = [r for t in tables.values() for r in t.to_pylist() if r["error"] is None]
    assert len(rows) == 9 and {r["model_version"] for r in rows} == {version}
    pixels, crops = [], []
    for row in rows:
        data, meta = inputs[row["key"]]
        x, width, height, crop = preprocess(data, (meta or {}).get("bbox"))
        assert (row["width"], row["height"]) == (width, height)
        pixels.append(x)
        crops.append(crop)
    with torch.inference_mode():
        outputs = model.eval()(torch.from_numpy(normalize(np.stack(pixels)))).numpy()
    crops = np.asarray(crops)
    got = np.asarray([r["landmarks"] for r in rows], dtype=np.float64)
    assert got.shape == (9, 68, 2)
    # In units of the model's output (fractions of the crop) the two agree to 1e-4 and better;
    # in pixels, up to float32's resolution at the coordinate (1.2e-4 at x = 1434).
    got_uv = (got - crops[:, None, :2]) / crops[:, None, 2:3]
    np.testing.assert_allclose(got_uv, outputs.reshape(-1, 68, 2), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, to_pixels(outputs, crops), atol=1e-4, rtol=1e-6)
    # The outputs really are spread over the crop, not one constant point.
    assert np.ptp(got[0], axis=0).min() > 0.5


def test_bad_members_give_error_rows_and_the_shard_goes_on(result):
    rows = {r["key"]: r for r in result[2]["part-mixed.parquet"].to_pylist()}
    assert rows["mixed-1"]["error"].startswith("cannot decode image")
    assert rows["mixed-1"]["landmarks"] is None and rows["mixed-1"]["width"] is None
    assert rows["mixed-2"]["error"] == "no image member for key 'mixed-2' (found .txt)"
    for key in ("mixed-0", "photo-takeo", "photo-breakingbad"):
        assert rows[key]["error"] is None and len(rows[key]["landmarks"]) == 68


def test_real_photos_decode_and_land_inside_their_images(result):
    rows = {r["key"]: r for r in result[2]["part-mixed.parquet"].to_pylist()}
    for key, name, size in (("photo-takeo", "takeo.ppm", (150, 225)),
                            ("photo-breakingbad", "breakingbad.jpg", (1920, 1080))):
        row = rows[key]
        assert (row["width"], row["height"]) == size == Image.open(f"tests/data/{name}").size
        points = np.asarray(row["landmarks"])
        assert ((points >= 0) & (points < np.asarray(size))).all(), key
        _, meta = real_photo(name)
        assert row["bbox"] == pytest.approx(meta["bbox"], abs=1e-3)
        assert json.loads(row["meta"])["landmarks"] == meta["landmarks"]
        # Only the right-hand face of the two-person photo is looked at: the crop is around it.
        x0, y0, x1, y1 = row["crop"]
        bx0, by0, bx1, by1 = meta["bbox"]
        assert x0 < bx0 and y0 < by0 and x1 > bx1 and y1 > by1
        assert x1 - x0 < 1.6 * max(bx1 - bx0, by1 - by0)


def test_another_input_with_the_same_shard_names_is_refused(result, weights_file, tmp_path):
    """faces-00000... from another folder would replace this output's files of the same names
    without a word (issue 21): the run stops before it touches the output."""
    output = result[1]
    other = tmp_path / "other"
    write_sample_archive(str(other), num_shards=2, samples_per_shard=1, seed=9,
                         image_size=(32, 32))
    before = {p.name: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"holds the results of the input .* --force"):
        _job(other, output, weights_file[0])
    assert {p.name: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()} == before


def test_rerun_overwrites_with_the_same_files_and_rows(result, archive, weights_file):
    """--force redoes every shard: each file is written again (not skipped), under the same
    name, with the same rows; nothing is added."""
    _, output, tables, *_ = result
    before = sorted(p.name for p in output.iterdir())
    written = {name: (output / name).stat().st_mtime_ns for name in tables}
    summary = _job(archive, output, weights_file[0], force=True)
    assert summary.skipped_shards == 0 and summary.files_committed == len(tables)
    assert sorted(p.name for p in output.iterdir()) == before
    for name, table in tables.items():
        assert (output / name).stat().st_mtime_ns != written[name], f"{name} was not rewritten"
        assert pq.read_table(output / name).equals(table), name


def test_parquet_and_loose_image_inputs(ray_session, archive, weights_file, result, tmp_path):
    """The same faces as Parquet rows (with their boxes) give the tar job's landmarks; loose
    files come out one row per file keyed by relative path."""
    inputs = _input_samples(archive)
    keys = [f"face-00000-{i:05d}" for i in range(3)]
    table = pa.table({
        "id": keys,
        "jpeg": [inputs[k][0] for k in keys],
        "bbox": [inputs[k][1]["bbox"] for k in keys],
        "source": ["synthetic"] * 3,
    })
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "batch-a.parquet")
    _job(tmp_path / "pq", tmp_path / "out-pq", weights_file[0], image_column="jpeg",
         key_column="id")
    got = pq.read_table(tmp_path / "out-pq" / "part-batch-a.parquet")
    assert got.column("key").to_pylist() == keys
    from_tar = result[2]["part-faces-00000.parquet"]
    np.testing.assert_allclose(np.asarray(got.column("landmarks").to_pylist()),
                               np.asarray(from_tar.column("landmarks").to_pylist()), atol=1e-4)
    assert json.loads(got.column("meta")[0].as_py())["source"] == "synthetic"

    loose = tmp_path / "loose"
    (loose / "sub").mkdir(parents=True)
    for i, key in enumerate(keys):
        png = io.BytesIO()
        Image.open(io.BytesIO(inputs[key][0])).save(png, format="PNG")
        (loose / ("sub" if i else ".") / f"{key}.png").write_bytes(png.getvalue())
    summary = _job(loose, tmp_path / "out-img", weights_file[0], files_per_shard=2,
                   detect="never")  # no boxes: the centred square, as this test checks
    groups = [s.name for s in list_shards(str(loose), files_per_shard=2)]  # by path hash
    assert (summary.shards, summary.samples, summary.errors) == (len(groups), 3, 0)
    parts = [pq.read_table(tmp_path / "out-img" / f"part-{name}.parquet") for name in groups]
    assert sorted(p.name for p in (tmp_path / "out-img").glob("part-*")) == sorted(
        f"part-{name}.parquet" for name in groups)
    assert [k for t in parts for k in t.column("key").to_pylist()] == [
        "face-00000-00000.png", "sub/face-00000-00001.png", "sub/face-00000-00002.png"]
    first = parts[0]
    assert first.column("bbox").null_count == first.num_rows  # no sidecar: the whole image
    assert first.column("crop")[0].as_py() == pytest.approx([0, -20, 160, 140])


def test_shards_with_the_worst_names_each_get_their_file_and_a_rerun_skips_them(
        ray_session, weights_file, tmp_path):
    """URL syntax ("::" made fsspec chain two shards into one file), glob characters (the
    resume check matched them as patterns), "%" and "#", spaces, and a folder tree too deep
    for one file name: each shard its own file, each key once, and a rerun redoes nothing."""
    root = tmp_path / "in"
    write_sample_archive(str(root), num_shards=1, samples_per_shard=1, image_size=(48, 48))
    tar = (root / "faces-00000.tar").read_bytes()
    (root / "faces-00000.tar").unlink()
    deep = "/".join(["d" * 60] * 5)
    for name in ("a::b", "x[1]", "100%", "sp ace#1", f"{deep}/deep"):
        (root / f"{name}.tar").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{name}.tar").write_bytes(tar)
    out = tmp_path / "out"
    summary = _job(root, out, weights_file[0])
    files = sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(files) == 5 and summary.files_committed == 5 and summary.errors == 0
    assert {"part-a%3A%3Ab.parquet", "part-x%5B1%5D.parquet", "part-100%25.parquet",
            "part-sp%20ace%231.parquet"} < set(files)
    assert all(len(name.encode()) <= 255 for name in files)
    shards = {pq.read_table(out / f).column("shard")[0].as_py() for f in files}
    assert len(shards) == 5  # each file holds its own shard's rows
    again = _job(root, out, weights_file[0])
    assert (again.skipped_shards, again.samples) == (5, 0)


def test_an_empty_shard_gets_an_empty_file(ray_session, weights_file, tmp_path):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "empty.tar", [])
    summary = _job(tmp_path / "in", tmp_path / "out", weights_file[0])
    assert summary.samples == 0
    table = pq.read_table(tmp_path / "out" / "part-empty.parquet")
    assert table.num_rows == 0 and table.schema.equals(SCHEMA)


def test_small_shards_share_full_predictor_calls_and_a_big_one_is_split(
        ray_session, weights_file, tmp_path):
    """Six shards of 2 samples and one of 6, units of 4 rows, files of at most 4 rows: the
    predictor gets full units whatever the shard sizes, and the big shard is two files."""
    write_sample_archive(str(tmp_path / "small"), num_shards=6, samples_per_shard=2, seed=5,
                         image_size=(48, 40))
    write_sample_archive(str(tmp_path / "big"), num_shards=1, samples_per_shard=6, seed=6,
                         image_size=(48, 40))
    inp = tmp_path / "in"
    (tmp_path / "small").rename(inp)
    (tmp_path / "big" / "faces-00000.tar").rename(inp / "big.tar")
    summary = _job(inp, tmp_path / "out", weights_file[0], unit_rows=4, rows_per_file=4)
    assert (summary.samples, summary.errors, summary.files_committed) == (18, 0, 8)
    # 18 rows of 7 shards in one read task: four full calls and the remainder.
    assert summary.predictor_calls == 5
    assert summary.rows_per_call == {"min": 2, "mean": 3.6, "max": 4}
    out = tmp_path / "out"
    first, rest = pq.read_table(out / "part-big.parquet"), pq.read_table(
        out / "part-big.c00001.parquet")
    assert first.column("key").to_pylist() + rest.column("key").to_pylist() == [
        f"face-00000-{i:05d}" for i in range(6)]
    assert [json.loads((out / "_done" / n).read_text())["first_row"]
            for n in ("big.json", "big.c00001.json")] == [0, 4]
    for s in range(6):
        table = pq.read_table(out / f"part-faces-{s:05d}.parquet")
        assert table.column("key").to_pylist() == [f"face-{s:05d}-{i:05d}" for i in range(2)]
