"""Test data builders shared by the test modules."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.model.geometry import IMAGENET_MEAN, IMAGENET_STD, NUM_LANDMARKS
from pipeline.training.augment import FLIP_PERMUTATION

DATA = Path(__file__).parents[1] / "data"


def real_photo(name: str) -> tuple[bytes, dict]:
    """Image bytes and a sidecar whose face box is the labelled landmarks' extent."""
    labels = json.loads((DATA / f"{name.rsplit('.', 1)[0]}.json").read_text())
    xs = [p[0] for p in labels["landmarks"]]
    ys = [p[1] for p in labels["landmarks"]]
    sidecar = {"bbox": [min(xs), min(ys), max(xs), max(ys)], "landmarks": labels["landmarks"]}
    return (DATA / name).read_bytes(), sidecar


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar file with the given (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def jpeg(image, orientation: int = 1, **save) -> bytes:
    """JPEG bytes of a PIL image at quality 90, with an EXIF orientation unless it is 1."""
    from PIL import Image

    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(buf, "JPEG", quality=90, exif=exif, **save)
    return buf.getvalue()


def bad_table(data: bytes) -> bytes:
    """A JPEG whose header passes the device-decode check but whose Huffman table every decoder
    refuses: it fails a batched decode call whole, on any device."""
    data = bytearray(data)
    dht = data.index(b"\xff\xc4")
    data[dht + 5:dht + 21] = b"\xff" * 16
    return bytes(data)


def sidecar(meta: dict) -> bytes:
    return json.dumps(meta).encode()


# Reference computations the tests check the library against (not used by the library itself).


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW with ImageNet mean/std (the CPU reference of the predictor)."""
    x = pixels.astype(np.float32) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def identity_params(n: int) -> dict:
    """Augmentation parameters that change nothing (no flip, rotation, scale, shift, colour,
    blur)."""
    zeros, ones = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    return {
        "flip": torch.zeros(n, dtype=torch.bool),
        "angle": zeros,
        "scale": ones,
        "shift": torch.zeros(n, 2, dtype=torch.float64),
        "brightness": ones,
        "contrast": ones,
        "saturation": ones,
        "blur": zeros,
    }


def flip_landmarks(points, width: float):
    """Mirror 68 labelled points of an image ``width`` pixels wide (integer = pixel centre):
    ``x -> width - 1 - x`` and the iBUG index swap. Works on numpy arrays and tensors."""
    if points.shape[-2] != NUM_LANDMARKS:
        raise ValueError(f"expected {NUM_LANDMARKS} points, got shape {tuple(points.shape)}")
    mirrored = points[..., list(FLIP_PERMUTATION), :] * 1.0
    mirrored[..., 0] = width - 1 - mirrored[..., 0]
    return mirrored


@functools.cache  # ~1.4 s to render; callers only read it
def synthetic_mean_shape(samples: int = 300, seed: int = 0) -> np.ndarray:
    """(68, 2) mean landmark positions in [0, 1] of the model's crop (the labelled extent grown by
    the default margin, squared), over synthetic faces: a prior that owes nothing to the real
    photos in tests/data."""
    from pipeline.demo.synthetic import render_face
    from pipeline.stages.preprocess import crop_square

    rng, uv = np.random.default_rng(seed), []
    for _ in range(samples):
        _, points, bbox = render_face(rng, (320, 240))
        x0, y0, side = crop_square(320, 240, bbox)
        uv.append((points - [x0, y0]) / side)
    return np.mean(uv, axis=0)


def mean_shape_model(path: Path) -> str:
    """A model file whose network answers every crop with ``synthetic_mean_shape()`` (the last
    layer's weights zero, its bias the mean shape's logit): what a trained model's answer
    would be on average, so the landmarks land on a face exactly when the crop frames it the
    way the model's crops are framed. Returns the path."""
    from pipeline.model.network import load_model, save_model

    model, _ = load_model(init="random", seed=0)
    last = model.classifier[-2]
    mean = torch.from_numpy(synthetic_mean_shape().reshape(-1)).float().clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.logit(mean))
    save_model(model, str(path), metadata={"made_by": "tests: mean shape"})
    return str(path)


def cluster_job(*args: str) -> dict:
    """Run ``tests/support/cluster_jobs.py`` (on a Ray cluster of its own, in a process of its
    own, away from this session's Ray); its ``RESULT`` line."""
    done = subprocess.run([sys.executable, "tests/support/cluster_jobs.py", *args],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=900)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


class TinyModel(torch.nn.Module):
    """Stands in for VGG16 in runner tests: cheap, and a function of each image alone; runs out
    of memory (simulated) on micro-batches of more than ``fail_above`` images."""

    def __init__(self, fail_above: int | None = None):
        super().__init__()
        self.fail_above = fail_above
        self.calls: list[int] = []
        self.head = torch.nn.Linear(3, 136)

    def forward(self, x):
        self.calls.append(x.shape[0])
        if self.fail_above is not None and x.shape[0] > self.fail_above:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.sigmoid(self.head(x.mean(dim=(2, 3))))


# -- the device decode path's bounds against the CPU path (docs/architecture.md, "Device
# decoding: how close to the CPU path"): the tests hold them, the pipeline does not need them.

@dataclass(frozen=True)
class Tolerance:
    """Largest allowed difference between this path's pixels and the CPU path's."""

    mean_abs: float  # mean |diff| over the 224x224x3 uint8 values, in levels
    p99_abs: float   # 99th percentile of |diff|, in levels

    def check(self, pixels: np.ndarray, reference: np.ndarray) -> tuple[float, float, bool]:
        """``(mean |diff|, p99 |diff|, within)`` of one image against its reference."""
        diff = np.abs(pixels.astype(np.int16) - reference.astype(np.int16))
        mean, p99 = float(diff.mean()), float(np.percentile(diff, 99))
        return mean, p99, mean <= self.mean_abs and p99 <= self.p99_abs


# Any device (nvJPEG's decoder noise included) against preprocess.preprocess.
TOLERANCE = Tolerance(mean_abs=3.0, p99_abs=24.0)
# The same decoded image (device="cpu", or nvJPEG's image through crop_and_resize): measured
# bit-identical; the bound allows for another libjpeg-turbo build's rounding.
SAME_DECODER_TOLERANCE = Tolerance(mean_abs=0.05, p99_abs=1.0)
# Landmarks from the two paths' pixels, in pixels of the oriented source image.
LANDMARK_TOLERANCE_PX = 0.5
