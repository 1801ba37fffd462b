"""The two pipeline stages, free of Ray: read+preprocess one shard, and predict a batch.

Ray Data calls them through ``map_batches`` (see ``pipeline.inference``); tests call them
directly. Batches are dicts of numpy arrays. Between the stages a batch carries:

=========== ==================== ===============================================================
column      dtype / shape        meaning
=========== ==================== ===============================================================
key         str                  sample key ("" for a shard-level error row)
shard       str                  input shard URI
shard_name  str                  output name stem of the shard
seq         int64                position of the row in its shard
last        bool                 True on the shard's final row (the writer knows it is complete)
width       int32                oriented image width (0 when unknown)
height      int32                oriented image height (0 when unknown)
bbox        float32 (4,)         sidecar face box, NaN when none
crop        float64 (3,)         square crop ``x0, y0, side`` in source pixels
meta        str                  sidecar JSON ("" when none)
error       str                  what went wrong ("" when fine)
error_kind  str                  one of ``preprocess.ERROR_KINDS`` ("" when fine)
pixels      uint8 (224, 224, 3)  the model input, zeros on error rows
=========== ==================== ===============================================================

The predictor drops ``pixels`` and adds ``landmarks`` (float32 (68, 2), NaN on error rows) and
``model_version``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline.faults import FaultPlan
from pipeline.model import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE, NUM_LANDMARKS
from pipeline.preprocess import (
    DEFAULT_MARGIN,
    DEFAULT_MAX_PIXELS,
    SampleError,
    preprocess,
    to_pixels,
)
from pipeline.shards import Sample, Shard, read_samples


def encode_shard(shard: Shard) -> str:
    return json.dumps(asdict(shard))


def decode_shard(text: str) -> Shard:
    fields = json.loads(text)
    fields["paths"] = tuple(fields["paths"])
    return Shard(**fields)


def empty_rows(n: int) -> dict[str, np.ndarray]:
    return {
        "key": np.empty(n, dtype=object),
        "shard": np.empty(n, dtype=object),
        "shard_name": np.empty(n, dtype=object),
        "seq": np.zeros(n, dtype=np.int64),
        "last": np.zeros(n, dtype=bool),
        "width": np.zeros(n, dtype=np.int32),
        "height": np.zeros(n, dtype=np.int32),
        "bbox": np.full((n, 4), np.nan, dtype=np.float32),
        "crop": np.full((n, 3), np.nan, dtype=np.float64),
        "meta": np.full(n, "", dtype=object),
        "error": np.full(n, "", dtype=object),
        "error_kind": np.full(n, "", dtype=object),
        "pixels": np.zeros((n, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8),
    }


def _shard_error(exc: Exception, samples_read: int) -> Sample:
    """The row that reports why a shard stopped; its kind says whether a rerun may help."""
    if isinstance(exc, FileNotFoundError):
        kind = "missing_file"
    elif isinstance(exc, OSError) and not isinstance(exc, tarfile.TarError):
        kind = "storage"
    else:
        kind = "shard_error"
    error = f"shard error after {samples_read} samples: {exc.__class__.__name__}: {exc}"
    return Sample(key="", error=error, error_kind=kind)


class ShardReader:
    """Read one shard and yield preprocessed batches of at most ``rows_per_batch`` rows."""

    def __init__(
        self,
        storage_options: Mapping[str, Any] | None = None,
        margin: float = DEFAULT_MARGIN,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_column: str = "image",
        key_column: str = "key",
        rows_per_batch: int = 32,
        faults: str = "",
    ):
        self.storage_options = dict(storage_options or {})
        self.margin = margin
        self.max_pixels = max_pixels
        self.image_column = image_column
        self.key_column = key_column
        self.rows_per_batch = rows_per_batch
        self.faults = FaultPlan(faults)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for text in batch["shard"]:
            yield from self.read(decode_shard(str(text)))

    def read(self, shard: Shard) -> Iterator[dict[str, np.ndarray]]:
        """Yield the shard's rows in order; the final row has ``last=True``."""
        pending: list[tuple[Sample, Any]] = []
        seq = 0
        first_seen: dict[str, int] = {}
        samples = read_samples(shard, self.storage_options, self.image_column, self.key_column)
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except Exception as exc:  # the shard itself is broken: keep what came before
                pending.append((_shard_error(exc, seq + len(pending)), None))
                break
            position = seq + len(pending)
            self.faults.at_read(shard.name, position)
            if sample.key in first_seen and not sample.error:
                sample.error = (f"duplicate key {sample.key!r}: first seen at row "
                                f"{first_seen[sample.key]} of this shard")
                sample.error_kind = "duplicate_key"
            first_seen.setdefault(sample.key, position)
            pending.append((sample, self._prepare(sample)))
            if len(pending) > self.rows_per_batch:
                # Hold one row back so the shard's final batch is never empty.
                yield self._to_batch(shard, pending[:-1], seq, last=False)
                seq += len(pending) - 1
                pending = pending[-1:]
        if pending:
            yield self._to_batch(shard, pending, seq, last=True)

    def _prepare(self, sample: Sample):
        if sample.error or sample.meta_error:
            return None
        bbox = (sample.meta or {}).get("bbox")
        try:
            return preprocess(sample.data, bbox, self.margin, self.max_pixels)
        except SampleError as exc:
            return exc
        except Exception as exc:  # a decoder bug must cost one sample, not the shard
            return SampleError(f"unexpected {exc.__class__.__name__} while decoding: {exc}")

    def _to_batch(self, shard: Shard, rows, first_seq: int, last: bool):
        out = empty_rows(len(rows))
        out["shard"][:] = shard.uri
        out["shard_name"][:] = shard.name
        out["seq"][:] = np.arange(first_seq, first_seq + len(rows))
        out["last"][-1] = last
        for i, (sample, prepared) in enumerate(rows):
            out["key"][i] = sample.key
            meta = sample.meta or {}
            if meta:
                out["meta"][i] = json.dumps(meta, ensure_ascii=False, sort_keys=True)
            bbox = meta.get("bbox")
            if isinstance(bbox, (list, tuple)) and len(bbox) == 4:
                with contextlib.suppress(TypeError, ValueError):  # bad boxes: error set below
                    out["bbox"][i] = np.asarray(bbox, dtype=np.float32)
            if sample.error:
                out["error"][i], out["error_kind"][i] = sample.error, sample.error_kind
            elif sample.meta_error:
                out["error"][i], out["error_kind"][i] = sample.meta_error, "bad_sidecar"
            elif isinstance(prepared, Exception):
                out["error"][i] = str(prepared)
                out["error_kind"][i] = getattr(prepared, "kind", "invalid")
            else:
                pixels, width, height, crop = prepared
                out["pixels"][i] = pixels
                out["width"][i], out["height"][i] = width, height
                out["crop"][i] = crop
        return out


class LandmarkPredictor:
    """Run the keypoint model on a batch. Loads the model once (once per Ray actor).

    On CUDA: bf16 autocast, channels_last. On CPU: fp32, so results match a plain forward pass.
    """

    def __init__(
        self,
        weights: str | None = None,
        init: str = "random",
        seed: int = 0,
        storage_options: Mapping[str, Any] | None = None,
        device: str = "auto",
        num_threads: int | None = None,
        faults: str = "",
    ):
        import torch

        from pipeline.model import load_model

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cpu":
            threads = num_threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or None
            if threads:
                torch.set_num_threads(threads)
        model, self.info = load_model(weights, init, storage_options, seed)
        self.model = model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.faults = FaultPlan(faults)
        self.batches = 0

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NHWC pixels -> (N, 136) model outputs in [0, 1], float32."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=on_cuda
        ):
            out = self.model(x)
        return out.float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches += 1
        self.faults.at_predict(self.batches)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        n = len(batch["key"])
        landmarks = np.full((n, NUM_LANDMARKS, 2), np.nan, dtype=np.float32)
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        if ok.any():
            outputs = self.forward(batch["pixels"][ok])
            landmarks[ok] = to_pixels(outputs, batch["crop"][ok])
        out["landmarks"] = landmarks
        out["model_version"] = np.full(n, self.info.version, dtype=object)
        return out

