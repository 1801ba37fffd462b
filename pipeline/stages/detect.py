"""The detect stage, free of Ray: the faces of one decoded image, each cut out as the landmark
model's crop.

With ``--decode cpu`` it runs in the read task, on the full-resolution image decoded there (with
``--decode gpu`` the predictor does the same on its device: ``pipeline.stages.predictor``): the
detector sees a copy scaled down to at most
``pipeline.model.detector.DETECT_SIZE`` pixels on its longer side, and each face's crop is cut
from the full image, so an image is decoded once whatever the number of faces. Each detector
box is mapped to the box the landmark model's crop convention expects
(``pipeline.model.detector.landmark_box``), then cropped like a sidecar box (``margin``).

``--detect auto`` detects when a sample has no sidecar ``bbox`` (a sidecar box wins),
``always`` detects in every image (sidecar boxes are ignored), ``never`` crops the sidecar box or
the centred square, as without this stage. Torch and the detector are loaded on first use, so a
read task over an archive with boxes never imports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.model.geometry import DEFAULT_FACE_THRESHOLD
from pipeline.stages.preprocess import (
    DEFAULT_MARGIN,
    DEFAULT_MAX_PIXELS,
    crop_and_resize,
    crop_square,
)

DETECT_MODES = ("auto", "always", "never")
DEFAULT_MAX_FACES = 20
DEFAULT_MIN_FACE_SIZE = 20.0  # image pixels, the detector box's shorter side


def no_face_error(threshold: float, min_size: float) -> str:
    """The ``error`` of a ``no_face`` row."""
    return f"no face found (score above {threshold:g}, at least {min_size:g} px)"


def face_crops(boxes, width: int, height: int, margin: float = DEFAULT_MARGIN
               ) -> list[tuple[float, float, float]]:
    """The landmark model's crop ``(x0, y0, side)`` of each detector box (N, 4) in a ``width`` x
    ``height`` image: the box mapped to the model's convention, grown by ``margin``."""
    from pipeline.model.detector import landmark_box

    return [crop_square(width, height, box, margin)
            for box in landmark_box(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)).tolist()]


def needs_detection(mode: str, bbox: object) -> bool:
    """Whether a sample with sidecar box ``bbox`` (None: no box) goes through the detector."""
    return mode == "always" or (mode == "auto" and bbox is None)


@dataclass(frozen=True)
class FoundFace:
    """One detected face: the landmark model's input and where it came from."""

    pixels: np.ndarray  # uint8 (224, 224, 3)
    crop: tuple[float, float, float]  # x0, y0, side in image pixels
    score: float
    box: np.ndarray  # float32 (4,): the detector's box x0, y0, x1, y1 in image pixels
    keypoints: np.ndarray  # float32 (5, 2): eyes, nose tip, mouth corners


@dataclass(frozen=True)
class ImageSettings:
    """How a sample's image becomes model inputs, wherever it is decoded (a read task or a
    predictor): the crop's margin, the size cap, and the face search's threshold, number of
    faces and smallest face."""

    margin: float = DEFAULT_MARGIN
    max_pixels: int = DEFAULT_MAX_PIXELS
    face_threshold: float = DEFAULT_FACE_THRESHOLD
    max_faces: int = DEFAULT_MAX_FACES
    min_face_size: float = DEFAULT_MIN_FACE_SIZE

    def no_face(self) -> str:
        """The ``error`` text of a ``no_face`` row under these settings."""
        return no_face_error(self.face_threshold, self.min_face_size)


class FaceFinder:
    """Finds faces in decoded RGB images, one image at a time (a read task's CPU work)."""

    def __init__(self, threshold: float = DEFAULT_FACE_THRESHOLD,
                 max_faces: int = DEFAULT_MAX_FACES,
                 min_size: float = DEFAULT_MIN_FACE_SIZE, margin: float = DEFAULT_MARGIN):
        self.threshold, self.max_faces = threshold, max_faces
        self.min_size, self.margin = min_size, margin
        self._model = None

    def __call__(self, image: Image.Image) -> list[FoundFace]:
        """The faces of ``image`` (oriented RGB), by descending score, at most ``max_faces``,
        each with its 224x224 crop."""
        import torch

        from pipeline.model.detector import detect, load_detector

        if self._model is None:
            self._model = load_detector("cpu")
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        (faces,) = detect(self._model, [pixels], self.threshold, self.max_faces, self.min_size)
        boxes = faces.boxes.numpy()
        crops = face_crops(boxes, *image.size, self.margin)
        return [FoundFace(crop_and_resize(image, crop), crop, score, box.astype(np.float32),
                          points.astype(np.float32))
                for crop, score, box, points in zip(crops, faces.scores.tolist(), boxes,
                                                    faces.keypoints.numpy(), strict=True)]
