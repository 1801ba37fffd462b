"""Labelled samples: read them from shards as training/evaluation crops, split them, import them.

A labelled sample is any sample of ``pipeline.io.shards`` (tar with a ``.json`` sidecar, or a
Parquet row) whose sidecar / columns hold ``landmarks``: 68 ``[x, y]`` pairs in 0-based pixels of
the EXIF-oriented image (integer = pixel centre), iBUG order; ``bbox`` is optional and defaults to
the landmarks' extent. The crop geometry is the inference job's: ``crop_square(w, h, bbox,
margin)``, and a label ``x`` becomes the model target ``u = (x - x0) / side``.

The train/validation split is a stable hash of the sample key, so it never depends on shard order,
worker count or Python's hash seed. ``pipeline.training.importer`` turns the common public layout (a
folder of images each with a 300-W ``.pts`` file: 300-W, HELEN, LFPW, AFW, iBUG) into such tar
shards.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from pipeline.config.errors import BadInput
from pipeline.io.shards import Sample, Shard, read_samples
from pipeline.model.geometry import INPUT_SIZE, NUM_LANDMARKS
from pipeline.stages.preprocess import (
    DEFAULT_MARGIN,
    DEFAULT_MAX_PIXELS,
    SampleError,
    crop_and_resize,
    crop_square,
    decode_image,
    validate_bbox,
)

log = logging.getLogger("pipeline")

SPLITS = ("all", "train", "val")


def parse_landmarks(value: object) -> np.ndarray:
    """A sidecar ``landmarks`` value -> float64 (68, 2); raises ``SampleError`` saying why not."""
    if value is None:
        raise SampleError("no landmarks in the sidecar (need 68 [x, y] pairs under 'landmarks')")
    try:
        points = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise SampleError("landmarks must be 68 [x, y] number pairs") from None
    if points.shape != (NUM_LANDMARKS, 2):
        raise SampleError(f"landmarks must be 68 [x, y] pairs, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise SampleError("landmarks hold NaN or infinite values")
    if np.array_equal(points[36], points[45]):
        raise SampleError("landmarks 36 and 45 (outer eye corners) coincide: cannot normalise")
    return points


def bbox_from_landmarks(points: np.ndarray) -> list[float]:
    """The landmarks' extent ``[x0, y0, x1, y1]``: the face box when the sidecar has none."""
    return [*np.min(points, 0).tolist(), *np.max(points, 0).tolist()]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def split_of(key: str, val_fraction: float) -> str:
    """``"val"`` for a stable ``val_fraction`` of keys, else ``"train"``."""
    position = int.from_bytes(_digest(key)[:8], "big") / 2.0**64
    return "val" if position < val_fraction else "train"


def key_hash(key: str) -> int:
    """A stable non-negative int64 of the key (independent of the split hash bits)."""
    return int.from_bytes(_digest(key)[8:16], "big") >> 1


def context_crop(crop: tuple[float, float, float], context: float) -> tuple[float, float, float]:
    """Grow the square ``(x0, y0, side)`` ``context`` times about its centre."""
    x0, y0, side = crop
    big = side * context
    return x0 + side / 2 - big / 2, y0 + side / 2 - big / 2, big


class LabelledReader:
    """Read labelled shards into crops and targets (a Ray-free stage; one shard per call).

    Yields batches of at most ``rows_per_batch`` rows::

        key        str                  sample key
        key_hash   int64                ``key_hash(key)``: assigns validation rows to workers
        pixels     uint8 (S, S, 3)      the crop, ``S = round(224 * context)``
        landmarks  float32 (68, 2)      labels in [0, 1] units of the crop
        pixel_uv   float32              one source pixel in crop units (``1 / side``)
        crop       float64 (3,)         ``x0, y0, side`` of the crop in source pixels

    ``context=1`` gives exactly the inference job's 224x224 input; training reads a larger
    context so rotations and shifts have real image around the face. Samples outside ``split``
    are skipped before decoding; unusable samples are logged and left out (they cannot be
    trained on) and counted in ``self.skipped``; a damaged shard keeps the samples read before
    the damage and is named in ``self.shard_errors``.
    """

    def __init__(
        self,
        split: str = "all",
        val_fraction: float = 0.0,
        context: float = 1.0,
        margin: float = DEFAULT_MARGIN,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        storage_options: Mapping[str, Any] | None = None,
        image_column: str = "image",
        key_column: str = "key",
        rows_per_batch: int = 32,
    ):
        if split not in SPLITS:
            raise BadInput(f"split must be one of {SPLITS}, got {split!r}")
        if context < 1:
            raise BadInput(f"context must be >= 1, got {context}")
        self.split, self.val_fraction = split, val_fraction
        self.context, self.size = context, int(round(INPUT_SIZE * context))
        self.margin, self.max_pixels = margin, max_pixels
        self.storage_options = dict(storage_options or {})
        self.image_column, self.key_column = image_column, key_column
        self.rows_per_batch = rows_per_batch
        self.skipped = 0
        self.shard_errors: list[str] = []

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        from pipeline.stages.reader import decode_shard

        for text in batch["shard"]:
            yield from self.read(decode_shard(str(text)))

    def read(self, shard: Shard) -> Iterator[dict[str, np.ndarray]]:
        """Yield the usable labelled rows of one shard, in order."""
        if shard.format == "images":
            raise BadInput(
                f"{shard.uri}: loose images carry no labels; turn them into labelled "
                "tar shards with `landmarks import-pts`"
            )
        rows: list[tuple] = []
        for sample in self._samples(shard):
            if self.split != "all" and split_of(sample.key, self.val_fraction) != self.split:
                continue
            try:
                rows.append(self.prepare(sample))
            except SampleError as exc:
                self.skipped += 1
                log.warning("skipping %s in %s: %s", sample.key, shard.uri, exc)
                continue
            if len(rows) == self.rows_per_batch:
                yield self._to_batch(rows)
                rows = []
        if rows:
            yield self._to_batch(rows)

    def _samples(self, shard: Shard) -> Iterator[Sample]:
        samples = read_samples(shard, self.storage_options, self.image_column, self.key_column)
        try:
            yield from samples
        except Exception as exc:  # one damaged shard must not stop a long training run
            self.shard_errors.append(f"{shard.uri}: {exc.__class__.__name__}: {exc}")
            log.warning("shard %s stopped early: %s", shard.uri, exc)

    def prepare(self, sample: Sample) -> tuple:
        """One sample -> ``(key, pixels, landmarks uv, pixel_uv, crop)``, or ``SampleError``."""
        if sample.error or sample.meta_error:
            raise SampleError(sample.error or sample.meta_error)
        meta = sample.meta or {}
        points = parse_landmarks(meta.get("landmarks"))
        image = decode_image(sample.data, self.max_pixels)
        width, height = image.size
        bbox = meta.get("bbox")
        bbox = bbox_from_landmarks(points) if bbox is None else validate_bbox(bbox, width, height)
        crop = context_crop(crop_square(width, height, bbox, self.margin), self.context)
        pixels = crop_and_resize(image, crop, self.size)
        x0, y0, side = crop
        uv = (points - np.asarray([x0, y0])) / side
        return sample.key, pixels, uv.astype(np.float32), np.float32(1.0 / side), crop

    def _to_batch(self, rows: list[tuple]) -> dict[str, np.ndarray]:
        keys = np.asarray([r[0] for r in rows], dtype=object)
        return {
            "key": keys,
            "key_hash": np.asarray([key_hash(k) for k in keys], dtype=np.int64),
            "pixels": np.stack([r[1] for r in rows]),
            "landmarks": np.stack([r[2] for r in rows]),
            "pixel_uv": np.asarray([r[3] for r in rows], dtype=np.float32),
            "crop": np.asarray([r[4] for r in rows], dtype=np.float64),
        }
