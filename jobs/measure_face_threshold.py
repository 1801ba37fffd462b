"""Recall and false positives of the face detector by score threshold, on real photos.

    .venv/bin/pip install scikit-image   # its sample images; not a dependency of the job
    python jobs/measure_face_threshold.py

Faces: scikit-image's photos with a face (``astronaut``, ``camera``: the cameraman) and the two
annotated photos in ``tests/data`` (a face matches when a detection's centre lies in the box of
its labelled landmarks, or, for the scikit-image photos, any detection above 0.05 counts as
the face's score), each as it is and as an "old archive photo": greyscale, scaled down 2-4x,
blurred, saved as a JPEG of quality 20 or 8. Non-faces: every other 2-D or RGB sample image
scikit-image ships (no download), at the detector's input size. For each threshold of a grid it
prints the share of faces kept and the detections on non-face images; then the faces' scores
and the highest non-face scores. ``docs/face-threshold.md`` has the figures.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.model.detector import detect, load_detector  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
GRID = (0.5, 0.6, 0.65, 0.7, 0.72, 0.75, 0.8, 0.85, 0.9, 0.95)
# Old-archive versions: (scale-down factor, blur sigma, JPEG quality or None)
DEGRADED = [(1, 0, None), (2, 3, 8), (3, 2, 20), (3, 3, 20), (4, 0, 20), (4, 2, None),
            (4, 2, 20), (4, 3, 8)]


def _degrade(image: Image.Image, scale: int, blur: float, quality: int | None) -> Image.Image:
    image = image.convert("L")
    image = image.resize((max(1, image.width // scale), max(1, image.height // scale)),
                         Image.BILINEAR)
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    if quality:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        image = Image.open(io.BytesIO(buffer.getvalue()))
    return image.convert("RGB")


def _scores(model, image: Image.Image):
    tensor = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    faces = detect(model, [tensor], threshold=0.05)[0]
    return faces.boxes.tolist(), faces.scores.tolist()


def _best_in(boxes, scores, box) -> float:
    best = 0.0
    for (x0, y0, x1, y1), score in zip(boxes, scores, strict=True):
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if box is None or (box[0] <= cx <= box[2] and box[1] <= cy <= box[3]):
            best = max(best, score)
    return best


def faces() -> list[tuple[str, Image.Image, tuple | None]]:
    """(name, photo, face box or None) of the real faces."""
    out = []
    for name, ext in (("takeo", "ppm"), ("breakingbad", "jpg")):
        points = np.asarray(json.loads((DATA / f"{name}.json").read_text())["landmarks"])
        box = (*points.min(axis=0), *points.max(axis=0))
        out.append((name, Image.open(DATA / f"{name}.{ext}"), box))
    from skimage import data

    for name in ("astronaut", "camera"):
        out.append((name, Image.fromarray(getattr(data, name)()), None))
    return out


def non_faces() -> list[tuple[str, Image.Image]]:
    from skimage import data

    out = []
    for name in ("brick", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel", "eagle",
                 "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
                 "logo", "moon", "page", "rocket", "text", "retina", "checkerboard"):
        try:
            array = getattr(data, name)()
        except Exception as exc:  # noqa: BLE001 - a sample that needs a download: left out
            print(f"(skipped {name}: {exc.__class__.__name__})")
            continue
        array = np.asarray(array)
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
            out.append((name, Image.fromarray(array[..., :3] if array.ndim == 3 else array)))
    try:
        left, right, _ = data.stereo_motorcycle()
        out += [("motorcycle_left", Image.fromarray(left)),
                ("motorcycle_right", Image.fromarray(right))]
    except Exception:  # noqa: BLE001
        pass
    return out


def main() -> None:
    model = load_detector()
    face_scores = {}
    for name, photo, box in faces():
        for scale, blur, quality in DEGRADED:
            image = _degrade(photo, scale, blur, quality) if (scale, blur, quality) != (
                1, 0, None) else photo.convert("RGB")
            scaled = None if box is None else tuple(v / scale for v in box)
            boxes, scores = _scores(model, image)
            face_scores[f"{name} x1/{scale} blur {blur} q{quality}"] = _best_in(boxes, scores,
                                                                               scaled)
    others = {}
    for name, image in non_faces():
        others[name] = _scores(model, image)[1]
    n_faces, n_images = len(face_scores), len(others)
    print(f"{n_faces} faces (4 photos, {len(DEGRADED)} versions each), {n_images} non-face "
          "images")
    print("threshold  faces kept  detections on non-face images  non-face images with one")
    for t in GRID:
        kept = sum(s > t for s in face_scores.values())
        false = sum(sum(s > t for s in scores) for scores in others.values())
        images = sum(any(s > t for s in scores) for scores in others.values())
        print(f"{t:9.2f}  {kept:4d}/{n_faces} {100 * kept / n_faces:5.1f} %  {false:10d}"
              f"  {images:10d}/{n_images}")
    print("\nfaces below 0.95:")
    for name, score in sorted(face_scores.items(), key=lambda kv: kv[1]):
        if score < 0.95:
            print(f"  {score:.3f}  {name}")
    print("\nhighest scores on non-face images:")
    top = sorted(((max(s, default=0.0), n) for n, s in others.items()), reverse=True)[:8]
    for score, name in top:
        print(f"  {score:.3f}  {name}")


if __name__ == "__main__":
    main()
