import io
import json
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.demo.synthetic import TEMPLATE_68, render_face, render_sample, write_sample_archive

LUMA = np.array([0.299, 0.587, 0.114])


def _luma(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64) @ LUMA


def _at(a: np.ndarray, pt: np.ndarray) -> float:
    x, y = np.rint(pt).astype(int)
    return float(a[y, x])


def _read_tar(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_template_is_a_centred_plausible_face():
    t = TEMPLATE_68
    assert t.shape == (68, 2) and t.dtype == np.float32
    assert np.abs(t).max() <= 1.05
    np.testing.assert_allclose((t.min(0) + t.max(0)) / 2, 0, atol=1e-6)
    assert np.all(np.diff(t[:17, 0]) > 0)  # jaw runs left to right ...
    assert t[8, 1] == t[:17, 1].max()  # ... with the chin lowest
    assert t[36, 0] < t[39, 0] < t[42, 0] < t[45, 0]  # 36 / 45 are the outer eye corners
    assert t[17:27, 1].max() < t[36:48, 1].min() < t[30, 1] < t[48:68, 1].min()
    assert t[48:68, 1].max() < t[8, 1]
    np.testing.assert_allclose(t[45], t[36] * [-1, 1], atol=1e-6)  # mirror-symmetric


def test_render_face_shapes_and_bbox():
    img, lm, bbox = render_face(np.random.default_rng(0), (200, 150))
    assert img.mode == "RGB" and img.size == (200, 150)
    assert lm.shape == (68, 2) and lm.dtype == np.float32
    assert bbox == [*lm.min(0).tolist(), *lm.max(0).tolist()]


@pytest.mark.parametrize("size", [(160, 120), (96, 128)])
def test_landmarks_inside_and_pose_varied(size):
    w, h = size
    rng = np.random.default_rng(1)
    iods, rolls = [], []
    for _ in range(150):
        img, lm, bbox, pose = render_sample(rng, size)
        assert img.size == size
        assert lm.min() >= -0.5 and (lm <= np.array([w, h]) - 0.5).all()
        iods.append(np.linalg.norm(lm[36] - lm[45]) / w)
        rolls.append(pose["roll"])
        assert abs(pose["roll"]) <= 30 and abs(pose["yaw"]) <= 35
        # Flip consistency: the image-left eye (36-41) stays left of the other one.
        left, right = lm[36:42].mean(0), lm[42:48].mean(0)
        if abs(pose["roll"]) < 20:
            assert left[0] < right[0]
    assert np.std(iods) > 0.04 and np.std(rolls) > 12


def test_labels_sit_on_the_drawn_features():
    rng = np.random.default_rng(2)
    open_mouths = 0
    for _ in range(60):
        img, lm, _, _ = render_sample(rng, (320, 240), clean=True)
        a = _luma(img)
        cheek = _at(a, (lm[30] + lm[3]) / 2)
        for eye in (lm[36:42], lm[42:48]):
            assert _at(a, eye.mean(0)) < cheek - 15  # the pupil, not skin
        # An open mouth shows the dark inside between the inner-lip points.
        if np.linalg.norm(lm[62] - lm[66]) > 8:
            open_mouths += 1
            assert _at(a, (lm[62] + lm[66]) / 2) < cheek - 15
    assert open_mouths >= 5


def test_clean_only_drops_blur_and_noise():
    img, lm, _ = render_face(np.random.default_rng(3))
    img_c, lm_c, _ = render_face(np.random.default_rng(3), clean=True)
    np.testing.assert_array_equal(lm, lm_c)
    diff = np.abs(_luma(img) - _luma(img_c))
    assert 0 < diff.mean() < 20


def test_archive_structure(tmp_path):
    uris = write_sample_archive(
        str(tmp_path / "out"), num_shards=2, samples_per_shard=3, seed=5, image_size=(120, 90)
    )
    assert uris == [f"{tmp_path}/out/faces-00000.tar", f"{tmp_path}/out/faces-00001.tar"]
    for s, uri in enumerate(uris):
        with open(uri, "rb") as f:
            members = _read_tar(f.read())
        names = [n for n, _ in members]
        keys = [f"face-{s:05d}-{i:05d}" for i in range(3)]
        assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json")]
        for (_, jpg), (_, js) in zip(members[::2], members[1::2], strict=True):
            meta = json.loads(js.decode("utf-8"))
            pts = np.array(meta["landmarks"])
            assert pts.shape == (68, 2)
            assert meta["bbox"] == [*pts.min(0).tolist(), *pts.max(0).tolist()]
            assert meta["scheme"] == "ibug68" and meta["source"] == "synthetic"
            assert meta["seed"] == 5 and set(meta["pose"]) == {"roll", "yaw", "pitch", "scale"}
            img = Image.open(io.BytesIO(jpg))
            assert img.format == "JPEG" and img.size == (120, 90)
            img.convert("RGB").load()


def test_archive_is_deterministic(tmp_path):
    kw = {"num_shards": 2, "samples_per_shard": 2, "image_size": (96, 72)}
    a = write_sample_archive(str(tmp_path / "a"), seed=7, **kw)
    b = write_sample_archive(str(tmp_path / "b") + "/", seed=7, **kw)
    c = write_sample_archive(str(tmp_path / "c"), seed=8, **kw)
    blobs = [[Path(u).read_bytes() for u in uris] for uris in (a, b, c)]
    assert blobs[0] == blobs[1]
    assert all(x != y for x, y in zip(blobs[0], blobs[2], strict=True))
    assert not b[0].startswith(str(tmp_path / "b") + "//")


def test_archive_to_memory_fs():
    uris = write_sample_archive(
        "memory://synthetic-test/faces", num_shards=1, samples_per_shard=2, image_size=(64, 48)
    )
    assert uris == ["memory://synthetic-test/faces/faces-00000.tar"]
    with fsspec.open(uris[0], "rb") as f:
        members = _read_tar(f.read())
    assert [n for n, _ in members] == [
        f"face-00000-0000{i}.{e}" for i in range(2) for e in ("jpg", "json")
    ]
    fsspec.filesystem("memory").rm("/synthetic-test", recursive=True)
