"""The predict stage, free of Ray: the keypoint model over a unit's rows (the row columns are
described in ``pipeline.stages.reader``).

``pipeline.backend.executor`` runs it in a Ray actor; tests call it directly. The predictor drops
``pixels`` / ``encoded`` / ``orientation`` / ``stored_size`` and adds ``landmarks`` (float32
(68, 2), NaN on error rows) and ``model_version``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.model.geometry import INPUT_SIZE, NUM_LANDMARKS
from pipeline.stages.faults import FaultPlan
from pipeline.stages.gpu_decode import decode_crop_resize
from pipeline.stages.preprocess import (
    DEFAULT_MAX_PIXELS,
    SampleError,
    crop_and_resize,
    decode_image,
    to_pixels,
)
from pipeline.stages.reader import DEVICE_DECODE_COLUMNS

NONFINITE_ERROR = ("the model's output for this image is not finite (NaN or inf): check the "
                   "weights file")


class LandmarkPredictor:
    """Run the keypoint model on a unit's rows. Loads the model once (once per Ray actor).

    The device work is ``pipeline.stages.runner.ModelRunner``'s: on CUDA bf16 autocast,
    channels_last, pinned double-buffered copies, optional ``torch.compile``; on CPU fp32, so
    results match a plain forward pass.
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
        micro_batch: int = 64,
        compile: bool = False,
        compile_backend: str = "inductor",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        import torch

        from pipeline.model.network import load_model
        from pipeline.stages.runner import ModelRunner

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cpu":
            threads = num_threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or None
            if threads:
                torch.set_num_threads(threads)
        model, self.info = load_model(weights, init, storage_options, seed)
        self.runner = ModelRunner(model, self.device, micro_batch, compile, compile_backend)
        self.max_pixels = max_pixels
        self.micro_batch = micro_batch
        self.faults = FaultPlan(faults)
        self.batches = 0
        self.cpu_fallbacks = 0  # decode="gpu": images the device decoder did not take

    def forward(self, pixels) -> np.ndarray:
        """uint8 NHWC pixels (numpy, or a tensor on the device) -> (N, 136) float32 outputs."""
        return self.runner.run(pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Predict a unit. Decoded pixels go to the runner whole (it works in micro-batches
        and overlaps their copies); encoded images are decoded ``micro_batch`` at a time, so a
        unit of large photos never sits decoded on the device all at once."""
        self.batches += 1
        n = len(batch["key"])
        if "encoded" in batch and n > self.micro_batch:
            parts = [self._predict({k: v[i : i + self.micro_batch] for k, v in batch.items()})
                     for i in range(0, n, self.micro_batch)]
            out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        else:
            out = self._predict(batch)
        self.faults.at_predict(self.batches)  # failure tests: die with the unit's rows computed
        return out

    def _predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items()
               if k != "pixels" and k not in DEVICE_DECODE_COLUMNS}
        n = len(batch["key"])
        landmarks = np.full((n, NUM_LANDMARKS, 2), np.nan, dtype=np.float32)
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        if "encoded" in batch and ok.any():
            with self.runner.stream():  # decode on the stream the model then runs on
                pixels, errors = self.decode_on_device(batch, np.flatnonzero(ok))
            if errors:  # the CPU fallback could not decode them either
                for column in ("error", "error_kind", "width", "height", "crop"):
                    out[column] = np.array(batch[column])  # batches may be read-only views
                keep = np.ones(len(pixels), dtype=bool)
                for j, (row, exc) in errors.items():
                    # An error row as the CPU path writes it: size and crop unknown.
                    out["error"][row], out["error_kind"][row] = str(exc), exc.kind
                    out["width"][row] = out["height"][row] = 0
                    out["crop"][row] = np.nan
                    ok[row], keep[j] = False, False
                pixels = pixels[np.flatnonzero(keep).tolist()]
        elif ok.any():
            pixels = batch["pixels"][ok]
        if ok.any():
            with self.runner.stream():
                outputs = self.forward(pixels)
            landmarks[ok] = to_pixels(outputs, batch["crop"][ok])
            broken = ok & ~np.isfinite(landmarks).all(axis=(1, 2))
            if broken.any():  # NaN / inf weights or activations: an error, never (0, 0) points
                for column in ("error", "error_kind"):
                    out[column] = np.array(out[column], dtype=object)  # may be read-only views
                out["error"][broken] = NONFINITE_ERROR
                out["error_kind"][broken] = "nonfinite_output"
                landmarks[broken] = np.nan
        out["landmarks"] = landmarks
        out["model_version"] = np.full(n, self.info.version, dtype=object)
        return out

    def decode_on_device(self, batch: dict[str, np.ndarray], rows: np.ndarray):
        """Decode, crop and resize ``rows`` of a ``decode="gpu"`` batch on the model's device.

        Returns ``(pixels, errors)``: uint8 (len(rows), 224, 224, 3) on the device, and
        ``{position in rows: (row, SampleError)}`` for images no decoder could read. JPEGs go
        through ``decode_crop_resize`` (nvJPEG on CUDA) in one call; the rest, and any it could
        not decode, through the CPU path (PIL) with the same crop."""
        import torch

        encoded = [batch["encoded"][r] for r in rows]
        device = np.flatnonzero(np.asarray(batch["on_device"])[rows])
        pixels = torch.zeros((len(rows), INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.uint8,
                             device=self.runner.device)
        failed = sorted(set(range(len(rows))) - set(device.tolist()))
        if len(device):
            picked = rows[device]
            decoded, not_decoded = decode_crop_resize(
                [encoded[j] for j in device], batch["orientation"][picked],
                batch["crop"][picked], self.runner.device,
                stored_sizes=batch["stored_size"][picked])
            pixels[torch.from_numpy(device).to(pixels.device)] = decoded
            failed = sorted(failed + [int(device[k]) for k in not_decoded])
        errors = {}
        for j in failed:
            self.cpu_fallbacks += 1
            try:
                image = decode_image(bytes(encoded[j]), self.max_pixels)
                cpu = crop_and_resize(image, tuple(batch["crop"][rows[j]]))
                pixels[j] = torch.from_numpy(cpu).to(pixels.device)
            except SampleError as exc:
                errors[j] = (int(rows[j]), exc)
            except Exception as exc:  # a decoder bug costs one sample, not the batch
                errors[j] = (int(rows[j]), SampleError(
                    f"unexpected {exc.__class__.__name__} while decoding: {exc}"))
        return pixels, errors
