"""Unit tests for pipeline.io.shards: listing inputs and streaming samples out of shards."""

import dataclasses
import hashlib
import io
import json
import os
import posixpath
import tarfile
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.demo.synthetic import write_sample_archive
from pipeline.io.shards import Sample, Shard, list_shards, read_samples

SMALL = (48, 36)


def _jpeg(color=(200, 100, 50), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(color=(10, 20, 30), size=(5, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]], dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write_tar(path: Path, members, dirs=()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_tar_bytes(members, dirs))
    return path


def _write_parquet(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture()
def memory_root():
    root = f"/shards-test-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Two synthetic tar shards plus a nested one, a hidden one and a non-shard file."""
    root = tmp_path_factory.mktemp("archive")
    uris = write_sample_archive(str(root), num_shards=2, samples_per_shard=3, image_size=SMALL)
    _write_tar(root / "sub" / "x.tar", [("k.jpg", _jpeg())])
    _write_tar(root / ".hidden.tar", [("h.jpg", _jpeg())])
    _write_tar(root / "_temporary.tar", [("t.jpg", _jpeg())])
    (root / "README.txt").write_text("not a shard")
    return root, uris


# --------------------------------------------------------------------------------------------
# list_shards
# --------------------------------------------------------------------------------------------


def test_list_folder_of_tars(archive):
    root, uris = archive
    shards = list_shards(str(root))
    assert [s.name for s in shards] == ["faces-00000", "faces-00001", "sub__x"]
    assert [s.uri for s in shards] == [
        f"{root}/faces-00000.tar",
        f"{root}/faces-00001.tar",
        f"{root}/sub/x.tar",
    ]
    assert [s.uri for s in shards[:2]] == uris
    assert all(s.format == "tar" for s in shards)
    assert [s.paths for s in shards] == [(s.uri,) for s in shards]
    assert all(s.root == str(root) for s in shards)


def test_list_folder_with_explicit_tar_format_and_trailing_slash(archive):
    root, _ = archive
    assert [s.name for s in list_shards(f"{root}/", fmt="tar")] == [
        "faces-00000",
        "faces-00001",
        "sub__x",
    ]


def test_list_single_file(archive):
    root, _ = archive
    shards = list_shards(f"{root}/faces-00001.tar")
    size = (root / "faces-00001.tar").stat().st_size
    assert shards[0].fingerprint.startswith(f"{size}:")
    assert [dataclasses.replace(s, fingerprint="") for s in shards] == [
        Shard(
            name="faces-00001",
            uri=f"{root}/faces-00001.tar",
            format="tar",
            paths=(f"{root}/faces-00001.tar",),
            root=str(root),
            size=size,
        )
    ]


def test_list_glob(archive):
    root, _ = archive
    shards = list_shards(f"{root}/faces-*.tar")
    assert [s.name for s in shards] == ["faces-00000", "faces-00001"]
    assert [s.uri for s in shards] == [f"{root}/faces-00000.tar", f"{root}/faces-00001.tar"]
    # A wildcard in a folder part: names stay relative to the part before the wildcard.
    nested = list_shards(f"{root}/s*/*.tar")
    assert [(s.name, s.uri) for s in nested] == [("sub__x", f"{root}/sub/x.tar")]


def test_list_glob_matching_nothing(archive):
    root, _ = archive
    with pytest.raises(ValueError, match="no tar shards found"):
        list_shards(f"{root}/nothing-*.tar")


def test_list_memory_filesystem(memory_root):
    uris = write_sample_archive(
        f"memory://{memory_root}/in", num_shards=2, samples_per_shard=2, image_size=SMALL
    )
    assert len(uris) == 2
    shards = list_shards(f"memory://{memory_root}/in")
    assert [s.name for s in shards] == ["faces-00000", "faces-00001"]
    assert all(s.uri.startswith("memory://") for s in shards)
    assert [s.uri.rsplit("/", 1)[1] for s in shards] == ["faces-00000.tar", "faces-00001.tar"]
    # The URIs are readable as they stand.
    keys = [sample.key for sample in read_samples(shards[1])]
    assert keys == ["face-00001-00000", "face-00001-00001"]
    with fsspec.open(shards[0].uri, "rb") as f:
        assert f.read(1024)[:512] != b"\0" * 512


def test_list_parquet(tmp_path):
    for name in ("b.parquet", "a.parquet", "deep/c.parquet"):
        _write_parquet(tmp_path / name, {"key": ["k"], "image": [b"x"]})
    shards = list_shards(str(tmp_path))
    assert [(s.name, s.format) for s in shards] == [
        ("a", "parquet"),
        ("b", "parquet"),
        ("deep__c", "parquet"),
    ]
    assert shards[0].uri == f"{tmp_path}/a.parquet"


def test_list_loose_images_grouped(tmp_path):
    names = ["a.jpg", "b.PNG", "c.jpeg", "sub/d.png", "sub/e.webp"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"img")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".thumb.jpg").write_bytes(b"img")
    shards = list_shards(str(tmp_path), files_per_shard=2)
    assert all(s.format == "images" and s.uri == str(tmp_path) for s in shards)
    assert all(s.root == str(tmp_path) for s in shards)
    # Every file once, in sorted order, cut where a file's path hash is an anchor.
    assert [p for s in shards for p in s.paths] == [f"{tmp_path}/{n}" for n in names]
    for shard in shards:
        first = posixpath.relpath(shard.paths[0], str(tmp_path))
        digest = hashlib.sha1(first.encode()).hexdigest()[:12]
        anchor = int(digest, 16) % 2 == 0
        assert shard.name == (f"images-{digest}" if anchor else "images-head"), shard
        assert all(int(hashlib.sha1(posixpath.relpath(p, str(tmp_path)).encode()).hexdigest()
                       [:12], 16) % 2 for p in shard.paths[1:])  # no anchor inside a group
    # One file per group: every file is its own anchor.
    assert [len(s.paths) for s in list_shards(str(tmp_path), files_per_shard=1)] == [1] * 5


def test_loose_image_groups_are_stable_under_insertions_and_removals(tmp_path):
    """Adding or removing files changes only their own groups: the other groups keep their
    names and files (so their outputs and completion records stay valid)."""
    names = [f"photos/{i // 40:02d}/img-{i:04d}.jpg" for i in range(400)]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"img")

    def groups():
        return {s.name: s.paths for s in list_shards(str(tmp_path), files_per_shard=10)}

    before = groups()
    sizes = [len(p) for p in before.values()]
    assert sum(sizes) == 400 and 20 <= len(sizes) <= 80 and max(sizes) <= 40
    (tmp_path / "photos/05/img-0222b.jpg").write_bytes(b"img")  # one more, in the middle
    (tmp_path / "photos/09/img-0399.jpg").unlink()  # one fewer, at the end
    after = groups()
    changed = {n for n in before.keys() | after.keys() if before.get(n) != after.get(n)}
    assert 2 <= len(changed) <= 3  # the two touched groups (+1 if the new file is an anchor)
    touched = [p for n in changed for p in (before.get(n, ()) + after.get(n, ()))]
    assert any(p.endswith("img-0222b.jpg") for p in touched)
    assert any(p.endswith("img-0399.jpg") for p in touched)
    # Position-based groups (the old rule) would have shifted every group after the insert.


def test_list_mixed_formats(tmp_path):
    _write_tar(tmp_path / "a.tar", [("k.jpg", _jpeg())])
    _write_parquet(tmp_path / "b.parquet", {"key": ["k"], "image": [b"x"]})
    (tmp_path / "c.jpg").write_bytes(_jpeg())
    (tmp_path / "d.png").write_bytes(_png())
    with pytest.raises(ValueError, match=r"several shard formats \(2 images, 1 parquet, 1 tar\)"):
        list_shards(str(tmp_path))
    assert [s.name for s in list_shards(str(tmp_path), fmt="tar")] == ["a"]
    assert [s.name for s in list_shards(str(tmp_path), fmt="parquet")] == ["b"]
    images = list_shards(str(tmp_path), fmt="images")
    assert [s.paths for s in images] == [(f"{tmp_path}/c.jpg", f"{tmp_path}/d.png")]


def test_list_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no tar shards found"):
        list_shards(str(tmp_path))
    (tmp_path / "x.txt").write_text("x")
    (tmp_path / "_y.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="no tar shards found"):
        list_shards(str(tmp_path))


def test_list_format_present_but_not_requested(tmp_path):
    _write_tar(tmp_path / "a.tar", [("k.jpg", _jpeg())])
    with pytest.raises(ValueError, match="no parquet shards found"):
        list_shards(str(tmp_path), fmt="parquet")


def test_list_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_shards(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        list_shards("memory:///no-such-prefix-for-shards-test")


def test_list_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        list_shards(str(tmp_path), fmt="zip")
    with pytest.raises(ValueError, match="files_per_shard must be >= 1"):
        list_shards(str(tmp_path), files_per_shard=0)


# --------------------------------------------------------------------------------------------
# read_samples: tar
# --------------------------------------------------------------------------------------------


def test_read_synthetic_tar(archive):
    root, _ = archive
    shard = list_shards(f"{root}/faces-00001.tar")[0]
    samples = list(read_samples(shard))
    assert [s.key for s in samples] == [f"face-00001-{i:05d}" for i in range(3)]
    with tarfile.open(shard.uri) as tar:
        written = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for s in samples:
        assert s.error is None and s.meta_error is None
        assert s.data == written[f"{s.key}.jpg"]
        assert s.meta == json.loads(written[f"{s.key}.json"])
        assert len(s.meta["landmarks"]) == 68 and len(s.meta["bbox"]) == 4
        assert Image.open(io.BytesIO(s.data)).size == SMALL


def test_read_hand_made_tar(tmp_path):
    a_img, b_img, d_img, e_img, f_img, g_img = (_jpeg((i * 40, 0, 0)) for i in range(6))
    members = [
        ("a.jpg", a_img),
        ("a.json", json.dumps({"bbox": [1, 2, 3, 4], "name": "Ä"}).encode()),
        ("b.png", b_img),
        ("c.txt", b"only text"),
        ("d.jpg", d_img),
        ("d.json", b"{not json"),
        ("e.jpg", e_img),
        ("e.json", b"[1, 2]"),
        ("dir/sub/f.jpg", f_img),
        ("dir/sub/f.json", b'{"x": 1}'),
        ("g.JPG", g_img),
        ("h.json", b'{"y": 2}'),
    ]
    path = _write_tar(tmp_path / "s.tar", members, dirs=("dir", "dir/sub"))
    samples = list(read_samples(list_shards(str(path))[0]))
    by_key = {s.key: s for s in samples}
    assert [s.key for s in samples] == ["a", "b", "c", "d", "e", "dir/sub/f", "g", "h"]

    assert by_key["a"] == Sample("a", a_img, {"bbox": [1, 2, 3, 4], "name": "Ä"})
    assert by_key["b"] == Sample("b", b_img)

    c = by_key["c"]
    assert c.data is None and c.error is not None
    assert "'c'" in c.error and ".txt" in c.error and "no image member" in c.error

    d = by_key["d"]
    assert d.data == d_img and d.meta is None and d.error is None
    assert d.meta_error is not None and "d.json is not valid JSON" in d.meta_error

    e = by_key["e"]
    assert e.data == e_img and e.meta is None
    assert "e.json" in e.meta_error and "JSON object" in e.meta_error

    assert by_key["dir/sub/f"] == Sample("dir/sub/f", f_img, {"x": 1})
    assert by_key["g"].data == g_img  # upper-case extension

    h = by_key["h"]
    assert h.data is None and h.meta == {"y": 2}
    assert "no image member for key 'h'" in h.error and ".json" in h.error


def test_read_truncated_tar_yields_samples_then_raises(tmp_path):
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big, "RGB").save(buf, "PNG")
    images = [buf.getvalue() + bytes([i]) for i in range(4)]  # distinct, > 10 kB each
    members = [(f"s{i}.png", img) for i, img in enumerate(images)]
    data = _tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        third = tar.getmembers()[2]
    # Cut in the middle of the third member's data.
    cut = third.offset_data + third.size // 2
    path = tmp_path / "broken.tar"
    path.write_bytes(data[:cut])
    samples = read_samples(list_shards(str(path))[0])
    got = []
    with pytest.raises(tarfile.ReadError):
        for s in samples:
            got.append(s)
    assert [s.key for s in got] == ["s0", "s1"]
    assert [s.data for s in got] == images[:2]


def test_read_tar_from_memory(memory_root):
    members = [("a.jpg", _jpeg()), ("a.json", b'{"k": "v"}')]
    fsspec.filesystem("memory").pipe_file(f"{memory_root}/t.tar", _tar_bytes(members))
    shard = list_shards(f"memory://{memory_root}/t.tar")[0]
    assert [(s.key, s.meta) for s in read_samples(shard)] == [("a", {"k": "v"})]


# --------------------------------------------------------------------------------------------
# read_samples: parquet
# --------------------------------------------------------------------------------------------


def test_read_parquet_custom_columns(tmp_path):
    imgs = [_jpeg((i * 50, 0, 0)) for i in range(3)]
    path = _write_parquet(
        tmp_path / "p.parquet",
        {
            "id": pa.array([7, 8, 9], pa.int64()),
            "img": pa.array(imgs, pa.binary()),
            "bbox": [[1.0, 2.0, 3.0, 4.0], None, [0.5, 0.5, 2.5, 2.5]],
            "label": ["x", "y", None],
            "thumb": pa.array([b"t0", b"t1", b"t2"], pa.binary()),
        },
    )
    shard = list_shards(str(path))[0]
    assert shard.format == "parquet" and shard.name == "p"
    samples = list(read_samples(shard, image_column="img", key_column="id"))
    assert [s.key for s in samples] == ["7", "8", "9"]
    assert [s.data for s in samples] == imgs
    assert [s.meta for s in samples] == [  # binary side columns as base64
        {"bbox": [1.0, 2.0, 3.0, 4.0], "label": "x", "thumb": "dDA="},
        {"bbox": None, "label": "y", "thumb": "dDE="},
        {"bbox": [0.5, 0.5, 2.5, 2.5], "label": None, "thumb": "dDI="},
    ]
    assert all(s.error is None and s.meta_error is None for s in samples)


def test_read_parquet_default_columns_without_extras(tmp_path):
    path = _write_parquet(tmp_path / "q.parquet", {"key": ["a", "b"], "image": [b"1", b"2"]})
    samples = list(read_samples(list_shards(str(path))[0]))
    assert samples == [Sample("a", b"1"), Sample("b", b"2")]


def test_read_parquet_missing_column(tmp_path):
    path = _write_parquet(tmp_path / "q.parquet", {"key": ["a"], "image": [b"1"]})
    with pytest.raises(ValueError, match=r"no column \['img'\]"):
        list(read_samples(list_shards(str(path))[0], image_column="img"))


# --------------------------------------------------------------------------------------------
# read_samples: loose images
# --------------------------------------------------------------------------------------------


def test_read_loose_images_keyed_by_relative_path(tmp_path):
    files = {"a.jpg": _jpeg(), "sub/b.png": _png(), "sub/deeper/c.jpg": _jpeg((1, 2, 3))}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    shards = list_shards(str(tmp_path), files_per_shard=2)
    samples = [s for shard in shards for s in read_samples(shard)]
    assert [s.key for s in samples] == ["a.jpg", "sub/b.png", "sub/deeper/c.jpg"]
    assert [s.data for s in samples] == list(files.values())
    assert all(s.meta is None and s.error is None for s in samples)


def test_read_loose_image_that_disappeared(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "b.jpg").write_bytes(_jpeg())
    shard = list_shards(str(tmp_path))[0]
    (tmp_path / "a.jpg").unlink()
    samples = list(read_samples(shard))
    assert [s.key for s in samples] == ["a.jpg", "b.jpg"]
    assert samples[0].data is None and "disappeared" in samples[0].error
    assert samples[1].error is None and samples[1].data == (tmp_path / "b.jpg").read_bytes()


def test_read_unknown_format():
    with pytest.raises(ValueError, match="unknown shard format"):
        list(read_samples(Shard(name="x", uri="/tmp/x.zip", format="zip", paths=("/tmp/x",))))


def test_shards_whose_output_names_collide_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.tar").write_bytes(b"")
    (tmp_path / "a__b.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"would both be written as part-a__b.parquet"):
        list_shards(str(tmp_path))


def test_fingerprint_changes_when_the_shard_changes(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(b"\0" * 1024)
    before = list_shards(str(tmp_path))[0].fingerprint
    assert list_shards(str(tmp_path))[0].fingerprint == before
    os.utime(path, (1_000_000, 1_000_000))
    assert list_shards(str(tmp_path))[0].fingerprint != before


# -- every member, key and file is a row or deliberately not input (issue 21) -------------


def _tar_with(path, entries):
    """entries: (TarInfo, bytes or None)."""
    with tarfile.open(path, "w") as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_links_devices_and_a_second_image_of_a_key_each_get_a_row(tmp_path):
    jpeg_bytes = b"\xff\xd8 image"
    path = _tar_with(tmp_path / "m.tar", [
        (_member("dir", tarfile.DIRTYPE), None),  # a folder entry: nothing to read
        (_member("dir/a.jpg"), jpeg_bytes),
        (_member("dir/b.jpg", tarfile.LNKTYPE, "dir/a.jpg"), None),  # hard link
        (_member("dir/c.jpg", tarfile.SYMTYPE, "a.jpg"), None),  # symbolic link
        (_member("dir/d.jpg", tarfile.CHRTYPE), None),  # a device
        (_member("h.jpeg"), jpeg_bytes + b"1"), (_member("h.png"), b"\x89PNG two"),
        (_member("h.json"), b'{"bbox": [0, 0, 1, 1]}')])
    samples = list(read_samples(list_shards(str(path))[0]))
    rows = [(s.key, s.error_kind) for s in samples]
    assert rows == [("dir/a", None), ("dir/b", "unsupported_member"),
                    ("dir/c", "unsupported_member"), ("dir/d", "unsupported_member"),
                    ("h", None), ("h", "duplicate_key")]
    assert "hard link to 'dir/a.jpg'" in samples[1].error
    assert "symbolic link to 'a.jpg'" in samples[2].error
    assert samples[4].data == jpeg_bytes + b"1" and samples[4].meta == {"bbox": [0, 0, 1, 1]}
    assert ".png" in samples[5].error and samples[5].data is None


def test_a_member_above_the_cap_is_a_row_and_is_never_read(tmp_path, monkeypatch):
    path = _tar_with(tmp_path / "big.tar", [(_member("big.jpg"), b"x" * 5000),
                                            (_member("small.jpg"), b"y" * 10)])
    reads = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, m: reads.append(m.name) or real(self, m))
    samples = list(read_samples(list_shards(str(path))[0], max_image_bytes=1000))
    assert [(s.key, s.error_kind) for s in samples] == [("big", "too_large"), ("small", None)]
    assert "5000 bytes, above the 1000 of --max-image-bytes" in samples[0].error
    assert reads == ["small.jpg"]  # the big member's bytes were skipped, not extracted


def test_null_and_empty_parquet_keys_are_rows_of_their_own_and_none_is_a_real_key(tmp_path):
    path = tmp_path / "k.parquet"
    pq.write_table(pa.table({"key": ["a", None, "", "None", "b"],
                             "image": [b"1", b"2", b"3", b"4", b"5"]}), path)
    samples = list(read_samples(list_shards(str(path))[0]))
    assert [(s.key, s.error_kind) for s in samples] == [
        ("a", None), ("", "bad_key"), ("", "bad_key"), ("None", None), ("b", None)]
    assert samples[1].error == "null 'key' at row 1" and samples[2].error == "empty 'key' at row 2"
    assert samples[3].data == b"4"  # the key "None" is a key like any other


def test_files_under_hidden_or_underscore_folders_are_not_input(tmp_path):
    root = tmp_path / "in"
    write_sample_archive(str(root), num_shards=1, samples_per_shard=1, image_size=(32, 32))
    for junk in ("_temporary/0/part-x.tar", ".staging/y.tar", "_SUCCESS.tar", "d/_tmp/z.tar"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes((root / "faces-00000.tar").read_bytes())
    assert [s.name for s in list_shards(str(root))] == ["faces-00000"]
    # The root itself may sit under such a folder: only what is below it counts.
    inner = tmp_path / "_landing" / "in"
    write_sample_archive(str(inner), num_shards=1, samples_per_shard=1, image_size=(32, 32))
    assert [s.name for s in list_shards(str(inner))] == ["faces-00000"]


NASTY = ["a::b", "x[1]", "y*?", "100%", "50%25", "tag#1", "sp ace", "Ünïcødé", "CASE", "case",
         "..", ".hidden", "a__b", "tab\there", "émoji😀", "x" * 300, "x" * 299 + "y"]


def _nasty_names(n: int, seed: int = 0) -> list[str]:
    """Generated file names (folders included) drawn from what breaks names: URL and glob
    syntax, "%", "#", spaces, any Unicode (NFC and NFD forms), case, great length."""
    import random
    import unicodedata

    rng = random.Random(seed)
    alphabet = list("aZ09-_.:[]*?%#@!$&'()+,;= ~\\") + ["é", "ß", "字", "😀", "\u0301", "İ"]
    names = set(NASTY)
    names.add(unicodedata.normalize("NFD", "Ünïcødé"))  # the same letters, decomposed
    while len(names) < n:
        parts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, rng.choice(
            (8, 40, 120))))) for _ in range(rng.randint(1, 3))]
        names.add("/".join(p.strip("/") or "p" for p in parts))
    return sorted(names)


def test_output_names_are_safe_unique_and_stable_for_any_path():
    from pipeline.io.shards import NAME_BYTES, NAME_SAFE, shard_name

    names = _nasty_names(600)
    mapped = {shard_name(n) for n in names}
    assert len(mapped) == len(names)  # no two paths share a name (case and NFC/NFD differ)
    for path in names:
        name = shard_name(path)
        assert set(name) <= NAME_SAFE | {"%"} and len(name.encode()) <= NAME_BYTES, path
        assert not name.startswith(".") and name == shard_name(path)  # stable
        assert len(f"part-{name}.c00001.parquet".encode()) <= 255
    assert shard_name("faces-00000") == "faces-00000"  # plain names are as they were
    assert shard_name("a::b") == "a%3A%3Ab" and shard_name("x[1]") == "x%5B1%5D"
    assert shard_name("100%") == "100%25" != shard_name("100%25")


def test_a_shard_written_under_an_older_name_is_retired_when_its_shard_is_listed(tmp_path):
    """Release N wrote part-sp ace.parquet; release N+1 names that shard sp%20ace: after its
    run completes the old file must go, or every key is in two files."""
    from pipeline.io import resume

    root = tmp_path / "in"
    write_sample_archive(str(root), num_shards=1, samples_per_shard=1, image_size=(32, 32))
    os.rename(root / "faces-00000.tar", root / "sp ace.tar")
    shard = list_shards(str(root))[0]
    assert shard.name == "sp%20ace"
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-sp ace.parquet").write_bytes(b"old rows")
    resume.write_completion_record(str(out), shard, "sp ace", 0, 0, True, 1, 0, False, "v",
                                   "s")
    present = resume.list_output(str(out))
    stale = resume.retire_stale_outputs(str(out), str(root), [shard], "v", "s", "run-1",
                                        present=present)
    assert stale == ["sp ace"]
    assert (out / "_retired/run-1/part-sp ace.parquet").exists()
    assert not (out / "part-sp ace.parquet").exists()


def test_a_loose_image_group_that_is_gone_is_retired(tmp_path):
    """Loose-image groups' records all name the input root; a group whose anchor file was
    deleted merges into its neighbour, and its old file used to stay: keys in two files."""
    from pipeline.io import resume

    root = tmp_path / "in"
    root.mkdir()
    for i in range(40):
        (root / f"img{i:03d}.jpg").write_bytes(b"\xff\xd8 jpeg %d" % i)
    before = list_shards(str(root), files_per_shard=4)
    assert len(before) > 3
    out = tmp_path / "out"
    out.mkdir()
    for shard in before:
        (out / f"part-{shard.name}.parquet").write_bytes(b"rows")
        resume.write_completion_record(str(out), shard, shard.name, 0, 0, True,
                                       len(shard.paths), 0, False, "v", "s")
    gone = before[2]  # its anchor file is deleted: the group is gone
    os.remove(gone.paths[0])
    after = list_shards(str(root), files_per_shard=4)
    assert gone.name not in {s.name for s in after}
    stale = resume.retire_stale_outputs(str(out), str(root), after, "v", "s", "run-2",
                                        present=resume.list_output(str(out)))
    assert stale == [gone.name]
    assert not (out / f"part-{gone.name}.parquet").exists()


def test_a_folder_that_cannot_be_listed_is_an_error_not_an_absence(tmp_path, monkeypatch):
    """fsspec's walk omits a folder it may not list: its shards vanished from the run, and
    their outputs were then retired as stale (issue 21). As root, a denied folder is simulated
    by the filesystem's own listing call."""
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.io import shards

    root = tmp_path / "in"
    write_sample_archive(str(root), num_shards=1, samples_per_shard=1, image_size=(32, 32))
    (root / "sub").mkdir()
    os.rename(root / "faces-00000.tar", root / "sub" / "b.tar")
    write_sample_archive(str(root), num_shards=1, samples_per_shard=1, image_size=(32, 32))
    denied = str(root / "sub")

    class Denied(LocalFileSystem):
        def ls(self, path, detail=False, **kwargs):
            if path.rstrip("/") == denied:
                raise PermissionError(13, "Permission denied", path)
            return super().ls(path, detail=detail, **kwargs)

    assert len(list_shards(str(root))) == 2
    monkeypatch.setattr(shards, "filesystem", lambda uri, opts=None: (Denied(), uri))
    with pytest.raises(PermissionError, match="access denied"):
        list_shards(str(root))
