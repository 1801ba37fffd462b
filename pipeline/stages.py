"""The read and predict stages, free of Ray: read + preprocess shards into units, and predict a
unit's rows.

``pipeline.executor`` runs them in Ray tasks and actors; tests call them directly. A unit's rows
are a dict of numpy arrays (which pieces of which shards they belong to is in the unit's
header, ``pipeline.units``). Between the stages the rows carry:

=========== ==================== ===============================================================
column      dtype / shape        meaning
=========== ==================== ===============================================================
key         str                  sample key ("" for a shard-level error row)
shard       str                  input shard URI
width       int32                oriented image width (0 when unknown)
height      int32                oriented image height (0 when unknown)
bbox        float32 (4,)         sidecar face box, NaN when none
crop        float64 (3,)         square crop ``x0, y0, side`` in source pixels
meta        str                  sidecar JSON ("" when none)
error       str                  what went wrong ("" when fine)
error_kind  str                  one of ``preprocess.ERROR_KINDS`` ("" when fine)
pixels      uint8 (224, 224, 3)  the model input, zeros on error rows (``decode="cpu"`` only)
encoded     bytes                the image file's bytes (``decode="gpu"`` only)
orientation int8                 its EXIF orientation 1..8 (``decode="gpu"`` only)
stored_size int32 (2,)           its width, height before orientation (``decode="gpu"`` only)
on_device   bool                 the device decoder takes it (``decode="gpu"`` only)
=========== ==================== ===============================================================

With ``decode="cpu"`` the read task decodes, crops and resizes (PIL). With ``decode="gpu"`` it
only reads each image's header (``gpu_decode.probe_and_crop``: size, EXIF orientation, crop)
and sends the encoded bytes on, so a batch weighs ~50 KB per 640x480 JPEG instead of 150 KB of
pixels; the predictor decodes the unit on its device (nvJPEG on CUDA) and crops and resizes
there (``gpu_decode.decode_crop_resize``). Images the device decoder does not take (PNG, CMYK
JPEG, ...) or fails on are decoded by the CPU path inside the predictor, one by one.

The predictor drops ``pixels`` / ``encoded`` / ``orientation`` / ``stored_size`` and adds
``landmarks`` (float32 (68, 2), NaN on error rows) and ``model_version``.
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
from pipeline.geometry import INPUT_SIZE, NUM_LANDMARKS
from pipeline.gpu_decode import decode_crop_resize, probe_and_crop
from pipeline.preprocess import (
    DEFAULT_MARGIN,
    DEFAULT_MAX_PIXELS,
    SampleError,
    crop_and_resize,
    decode_image,
    preprocess,
    to_pixels,
)
from pipeline.shards import Sample, Shard, read_samples
from pipeline.units import (
    DEFAULT_ROWS_PER_FILE,
    ReadTask,
    ShardTask,
    UnitBuilder,
    UnitHeader,
)


def encode_shard(shard: Shard) -> str:
    return json.dumps(asdict(shard))


def decode_shard(text: str) -> Shard:
    fields = json.loads(text)
    fields["paths"] = tuple(fields["paths"])
    return Shard(**fields)


DECODE_MODES = ("cpu", "gpu")
DEVICE_DECODE_COLUMNS = ("encoded", "orientation", "stored_size", "on_device")
# What a unit may hold: rows, and bytes of pixels (decode="cpu") or encoded images ("gpu").
DEFAULT_UNIT_BYTES = 256 << 20


def empty_rows(n: int, decode: str = "cpu") -> dict[str, np.ndarray]:
    rows = {
        "key": np.empty(n, dtype=object),
        "shard": np.empty(n, dtype=object),
        "width": np.zeros(n, dtype=np.int32),
        "height": np.zeros(n, dtype=np.int32),
        "bbox": np.full((n, 4), np.nan, dtype=np.float32),
        "crop": np.full((n, 3), np.nan, dtype=np.float64),
        "meta": np.full(n, "", dtype=object),
        "error": np.full(n, "", dtype=object),
        "error_kind": np.full(n, "", dtype=object),
    }
    if decode == "gpu":
        rows["encoded"] = np.full(n, b"", dtype=object)
        rows["orientation"] = np.ones(n, dtype=np.int8)
        rows["stored_size"] = np.zeros((n, 2), dtype=np.int32)
        rows["on_device"] = np.zeros(n, dtype=bool)
    else:
        rows["pixels"] = np.zeros((n, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    return rows


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
    """The read stage: stream the shards of a read task and yield units of preprocessed rows.

    ``read_task`` yields ``(UnitHeader, rows)`` per unit (``pipeline.units``): a unit closes at
    ``unit_rows`` rows or ``unit_bytes`` bytes, and its header maps its rows to output pieces of
    ``rows_per_file`` rows. Rows of pieces a task says to skip are read past (a tar has to be)
    but neither decoded nor sent on.
    """

    def __init__(
        self,
        storage_options: Mapping[str, Any] | None = None,
        margin: float = DEFAULT_MARGIN,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_column: str = "image",
        key_column: str = "key",
        unit_rows: int = 32,
        faults: str = "",
        decode: str = "cpu",
        rows_per_file: int = DEFAULT_ROWS_PER_FILE,
        unit_bytes: int = DEFAULT_UNIT_BYTES,
    ):
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.decode = decode
        self.storage_options = dict(storage_options or {})
        self.margin = margin
        self.max_pixels = max_pixels
        self.image_column = image_column
        self.key_column = key_column
        self.unit_rows = unit_rows
        self.rows_per_file = rows_per_file
        self.unit_bytes = unit_bytes
        self.faults = FaultPlan(faults)

    def read(self, shard: Shard) -> Iterator[dict[str, np.ndarray]]:
        """The rows of one whole shard, in units (without their headers)."""
        for _, rows in self.read_task(ReadTask(0, (ShardTask(shard),))):
            yield rows

    def read_task(self, task: ReadTask) -> Iterator[tuple[UnitHeader, dict[str, np.ndarray]]]:
        """Yield the task's units in order; every row of every shard is in exactly one."""
        builder = UnitBuilder(task.index, self.rows_per_file, self.unit_rows, self.unit_bytes)
        pending: list[tuple[str, Sample, Any]] = []
        for i, item in enumerate(task.shards):
            rows = 0
            for row, sample, is_last in self._shard_rows(item):
                self.faults.at_read(item.shard.name, row, builder.units)
                prepared = self._prepare(sample)
                pending.append((item.shard.uri, sample, prepared))
                rows += 1
                if builder.add(i, row, is_last, self._weight(prepared)):
                    yield builder.flush(), self._to_batch(pending)
                    pending = []
            if rows == 0 and not item.skip:
                builder.empty_shard(i)
        if builder.pending():
            yield builder.flush(), self._to_batch(pending)

    def _shard_rows(self, item: ShardTask) -> Iterator[tuple[int, Sample, bool]]:
        """``(row, sample, is_last_row)`` of the rows to process, reading one sample ahead so
        the last row is known as such. A shard that stops part-way ends with an error row."""
        shard = item.shard
        samples = read_samples(shard, self.storage_options, self.image_column, self.key_column)

        def fetch() -> tuple[Sample | None, Exception | None]:
            try:
                return next(samples), None
            except StopIteration:
                return None, None
            except Exception as exc:  # the shard itself is broken: keep what came before
                return None, exc

        first_seen: dict[str, int] = {}
        row = 0
        current, error = fetch()
        while current is not None:
            following, error = fetch()
            if current.key in first_seen and not current.error:
                current.error = (f"duplicate key {current.key!r}: first seen at row "
                                 f"{first_seen[current.key]} of this shard")
                current.error_kind = "duplicate_key"
            first_seen.setdefault(current.key, row)
            if row // self.rows_per_file not in item.skip:
                yield row, current, following is None and error is None
            row += 1
            current = following
        if error is not None:
            # The error row goes into the first piece still to do from here on (a piece done
            # before was complete: its rows are all there).
            piece = row // self.rows_per_file
            while piece in item.skip:
                piece += 1
            yield max(row, piece * self.rows_per_file), _shard_error(error, row), True

    def _prepare(self, sample: Sample):
        if sample.error or sample.meta_error:
            return None
        bbox = (sample.meta or {}).get("bbox")
        try:
            if self.decode == "gpu":
                info, crop = probe_and_crop(sample.data, bbox, self.margin, self.max_pixels)
                return info, crop, sample.data
            return preprocess(sample.data, bbox, self.margin, self.max_pixels)
        except SampleError as exc:
            return exc
        except Exception as exc:  # a decoder bug must cost one sample, not the shard
            return SampleError(f"unexpected {exc.__class__.__name__} while decoding: {exc}")

    def _weight(self, prepared) -> int:
        """Bytes a row adds to its unit: its pixels, or its encoded image."""
        if prepared is None or isinstance(prepared, Exception):
            return 0
        return INPUT_SIZE * INPUT_SIZE * 3 if self.decode == "cpu" else len(prepared[2])

    def _to_batch(self, rows: list[tuple[str, Sample, Any]]) -> dict[str, np.ndarray]:
        out = empty_rows(len(rows), self.decode)
        for i, (uri, sample, prepared) in enumerate(rows):
            out["key"][i] = sample.key
            out["shard"][i] = uri
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
            elif self.decode == "gpu":
                info, crop, data = prepared
                out["encoded"][i] = data
                out["orientation"][i] = info.orientation
                out["stored_size"][i] = info.width, info.height
                out["on_device"][i] = info.device_decodable
                out["width"][i], out["height"][i] = info.oriented_width, info.oriented_height
                out["crop"][i] = crop
            else:
                pixels, width, height, crop = prepared
                out["pixels"][i] = pixels
                out["width"][i], out["height"][i] = width, height
                out["crop"][i] = crop
        return out


class LandmarkPredictor:
    """Run the keypoint model on a unit's rows. Loads the model once (once per Ray actor).

    The device work is ``pipeline.runner.ModelRunner``'s: on CUDA bf16 autocast, channels_last,
    pinned double-buffered copies, optional ``torch.compile``; on CPU fp32, so results match a
    plain forward pass.
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

        from pipeline.model import load_model
        from pipeline.runner import ModelRunner

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
