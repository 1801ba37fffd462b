"""The predict stage, free of Ray: the keypoint model over a unit's rows (the row columns are
described in ``pipeline.stages.reader``).

``pipeline.backend.executor`` runs it in a Ray actor; tests call it directly. The predictor drops
the columns only the stages use (``pipeline.io.rows.TRAVEL_ONLY``: pixels, image bytes) and adds
``landmarks`` (NaN on error rows) and ``model_version``.

Rows marked ``find_faces`` (``--decode gpu``, a sample without a box) are searched for faces
here: the image is decoded once on the device (nvJPEG on CUDA; the CPU path for what nvJPEG does
not take), the detector runs on the decoded images of the batch together, and each face's crop
is cut from the decoded image (``gpu_decode.crop_decoded``). Such a row becomes one row per face,
or one ``no_face`` row; the output then has a ``source_row`` column (the input row each output row
comes from), from which the executor rewrites the unit's header (``units.expand_header``).

Rows with encoded images (``--decode gpu``) come out with a ``device_decode`` column (not
written to Parquet: the executor counts it into the unit's header): ``"ok"`` for an image decoded
on the device, a reason from ``gpu_decode.FALLBACK_REASONS`` for one that took the CPU path,
``""`` for rows the predictor did not decode (error rows; an image's further faces).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.io.rows import BY_NAME, TRAVEL_ONLY
from pipeline.model.geometry import INPUT_SIZE
from pipeline.stages.detect import ImageSettings, face_crops
from pipeline.stages.faults import FaultPlan
from pipeline.stages.gpu_decode import (
    FORMAT,
    budget_parts,
    crop_decoded,
    decode_budget,
    decode_crop_resize,
    decode_images,
    oriented,
)
from pipeline.stages.preprocess import (
    SampleError,
    crop_and_resize,
    decode_image,
    to_pixels,
)

# Images decoded on the device at once to find faces: at most this many decoded full-size
# images (and at most ``gpu_decode.decode_budget`` pixels of them) sit on the device together.
DETECT_CHUNK = 32
DECODE_COLUMN = "device_decode"  # per row: "ok", a fallback reason, or "" (not decoded here)
DECODED_ON_DEVICE = "ok"

NONFINITE_ERROR = ("the model's output for this image is not finite (NaN or inf): check the "
                   "weights file")


def decode_counts(column) -> dict[str, int]:
    """A unit's ``device_decode`` column as counts: images decoded on the device (``ok``) and
    the CPU fallbacks by reason."""
    values, counts = np.unique(np.asarray([v for v in column if v], dtype=str),
                               return_counts=True)
    return {str(v): int(n) for v, n in zip(values, counts, strict=True)}


@dataclass(frozen=True)
class PredictorSettings:
    """What a predictor needs, built once from the job's config (``pipeline.inference.job``)
    and handed to every predictor actor as it is. ``expected_version``: the model version the
    run records; a model file that loads as another one stops the actor."""

    weights: str | None = None
    init: str = "random"
    seed: int = 0
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    device: str = "auto"
    num_threads: int | None = None
    micro_batch: int = 64
    compile: bool = False
    compile_backend: str = "inductor"
    precision: str = "auto"
    images: ImageSettings = ImageSettings()
    expected_version: str | None = None
    faults: str = ""


class LandmarkPredictor:
    """Run the keypoint model on a unit's rows. Loads the model once (once per Ray actor).

    The device work is ``pipeline.stages.runner.ModelRunner``'s: ``precision`` (``auto``: bf16
    autocast with an fp32 head on CUDA, fp32 on the CPU, so results match a plain forward
    pass), channels_last, double-buffered copies, optional ``torch.compile``.
    """

    def __init__(self, settings: PredictorSettings = PredictorSettings(),
                 weights_data: bytes | None = None):
        """``weights_data``: the model file's bytes as the run read them once (``weights``
        then only names the file); without them the file is read from ``weights``."""
        import torch

        from pipeline.model.identity import check_loaded
        from pipeline.model.network import load_model
        from pipeline.stages.runner import ModelRunner

        s = self.settings = settings
        device = s.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cpu":
            threads = s.num_threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or None
            if threads:
                torch.set_num_threads(threads)
        model, self.info = load_model(s.weights, s.init, s.storage_options, s.seed,
                                      weights_data)
        check_loaded(self.info, s.expected_version)  # the version the run records, or stop
        self.runner = ModelRunner(model, self.device, s.micro_batch, s.compile,
                                  s.compile_backend, s.precision)
        self.images, self.micro_batch = s.images, s.micro_batch
        self.faults = FaultPlan(s.faults)
        self.batches = 0
        self._detector = None  # loaded on the first row to search for faces

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
            starts = range(0, n, self.micro_batch)
            parts = [self._predict({k: v[i : i + self.micro_batch] for k, v in batch.items()})
                     for i in starts]
            if any("source_row" in p for p in parts):  # faces were found: rows of the unit
                for start, p in zip(starts, parts, strict=True):
                    p["source_row"] = p.get("source_row", np.arange(len(p["key"]))) + start
            out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        else:
            out = self._predict(batch)
        self.faults.at_predict(self.batches)  # failure tests: die with the unit's rows computed
        return out

    def _predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        source, found, slot = None, None, None
        if "encoded" in batch:
            decoded = np.full(len(batch["key"]), "", dtype=object)
        if "find_faces" in batch and np.any(batch["find_faces"]):
            with self.runner.stream():
                batch, source, found, slot, decoded = self.find_faces(batch)
        out = {k: v for k, v in batch.items() if k not in TRAVEL_ONLY}
        n = len(batch["key"])
        landmarks = BY_NAME["landmarks"].empty(n)
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        if "encoded" in batch and ok.any():
            # Rows whose faces were found here have their crops cut already; decode the rest.
            rest = ok if slot is None else ok & (slot < 0)
            with self.runner.stream():  # decode on the stream the model then runs on
                pixels, errors, paths = self.decode_on_device(batch, np.flatnonzero(rest))
                decoded[np.flatnonzero(rest)] = paths
                if slot is not None:
                    pixels = self._with_faces(pixels, ok, rest, found, slot)
            if errors:  # the CPU fallback could not decode them either
                for column in ("error", "error_kind", "width", "height", "crop"):
                    out[column] = np.array(batch[column])  # batches may be read-only views
                position = np.cumsum(ok) - 1  # row -> its place in pixels (the ok rows)
                keep = np.ones(len(pixels), dtype=bool)
                for row, exc in errors.values():
                    # An error row as the CPU path writes it: size and crop unknown.
                    out["error"][row], out["error_kind"][row] = str(exc), exc.kind
                    out["width"][row] = out["height"][row] = 0
                    out["crop"][row] = np.nan
                    keep[position[row]] = False
                ok[[row for row, _ in errors.values()]] = False
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
        if "encoded" in batch:
            out[DECODE_COLUMN] = decoded
        if source is not None:
            out["source_row"] = source
        return out

    @staticmethod
    def _with_faces(decoded, ok: np.ndarray, rest: np.ndarray, found, slot: np.ndarray):
        """The pixels of the ``ok`` rows, in order: the faces' crops from ``found`` (by
        ``slot``), the ``rest`` rows' from ``decoded``."""
        import torch

        device = found.device
        pixels = torch.empty((int(ok.sum()), INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.uint8,
                             device=device)
        position = np.cumsum(ok) - 1  # row -> its place among the ok rows
        faces = np.flatnonzero(ok & (slot >= 0))
        if len(faces):
            pixels[torch.from_numpy(position[faces]).to(device)] = found[
                torch.from_numpy(slot[faces]).to(device)]
        if rest.any():
            pixels[torch.from_numpy(position[np.flatnonzero(rest)]).to(device)] = decoded
        return pixels

    def find_faces(self, batch: dict[str, np.ndarray]):
        """Search the ``find_faces`` rows of a ``decode="gpu"`` batch for faces on the device.

        Returns ``(rows, source, found, slot, decoded)``: the batch with each such row replaced
        by one row per face (crop, ``face`` columns set) or one error row (``no_face``, or the
        decode error), ``source`` the input row of each output row, ``found`` the faces' 224x224
        crops (uint8, on the device), ``slot`` each output row's index in ``found`` (-1 for
        rows whose crop is still to cut) and ``decoded`` the ``device_decode`` value of each
        output row (set on the first row of each image searched)."""
        import torch

        from pipeline.model.detector import load_detector

        device = self.runner.device
        if self._detector is None:
            self._detector = load_detector(device)
        ok = np.asarray([not e for e in batch["error"]], dtype=bool)
        rows = np.flatnonzero(np.asarray(batch["find_faces"]) & ok)
        # A few images at a time: decoded full-size images stay on the device only while
        # their faces are found and cut.
        errors, faces, crops, face_rows, found, paths = {}, {}, [], {}, [], {}
        sizes = [int(np.prod(batch["stored_size"][r], dtype=np.int64)) for r in rows]
        for part in budget_parts(sizes, decode_budget(device), DETECT_CHUNK):
            found.append(self._find_in(batch, rows, part, errors, faces, crops, face_rows,
                                       paths))
        found = torch.cat(found) if found else torch.zeros(
            (0, INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.uint8, device=device)
        # The expanded rows, in input order.
        where = {int(r): j for j, r in enumerate(rows)}
        source, slot = [], []
        for r in range(len(batch["key"])):
            j = where.get(r)
            count = len(face_rows[j]) if j in face_rows else 0
            source += [r] * max(1, count)
            slot += face_rows[j] if count else [-1]
        source, slot = np.asarray(source), np.asarray(slot)
        out = {k: np.asarray(v)[source] for k, v in batch.items()}
        for column in ("error", "error_kind"):
            out[column] = np.array(out[column], dtype=object)
        decoded = np.full(len(source), "", dtype=object)
        for j in range(len(rows)):
            at = int(np.searchsorted(source, rows[j]))
            decoded[at] = paths[j]
            if j in errors:
                out["error"][at], out["error_kind"][at] = str(errors[j]), errors[j].kind
                out["width"][at] = out["height"][at] = 0
            elif not face_rows[j]:
                out["error"][at] = self.images.no_face()
                out["error_kind"][at] = "no_face"
            if face_rows.get(j):
                count, (scores, boxes, points) = len(face_rows[j]), faces[j]
                out["face"][at:at + count] = np.arange(count)
                out["face_score"][at:at + count] = scores
                out["face_box"][at:at + count] = boxes
                out["face_points"][at:at + count] = points
                out["crop"][at:at + count] = [crops[index] for index in face_rows[j]]
        out["find_faces"] = np.zeros(len(source), dtype=bool)
        return out, source, found, slot, decoded

    def _find_in(self, batch, rows, part, errors, faces, crops, face_rows, paths):
        """``find_faces`` for the rows ``rows[j]``, ``j`` in ``part``: decode them once, detect
        in one batch, cut each face's crop. Fills ``errors[j]``, ``faces[j]`` (scores, boxes,
        keypoints on the host), ``face_rows[j]`` (indices into ``crops``, which it extends),
        ``paths[j]`` (``device_decode``); returns the crops' pixels on the device."""
        import torch

        from pipeline.model.detector import detect

        device = self.runner.device
        encoded = {j: bytes(batch["encoded"][rows[j]]) for j in part}
        # Decode once: stored images and their orientation; the CPU path gives oriented ones.
        images, orientations = {}, {j: 1 for j in part}
        paths.update((j, FORMAT) for j in part)
        on_device = [j for j in part if batch["on_device"][rows[j]]]
        if on_device:
            decoded, failed = decode_images([encoded[j] for j in on_device], device,
                                            batch["stored_size"][rows[on_device]])
            for k, (j, image) in enumerate(zip(on_device, decoded, strict=True)):
                if image is None:
                    paths[j] = failed[k]
                else:
                    images[j], orientations[j] = image, int(batch["orientation"][rows[j]])
                    paths[j] = DECODED_ON_DEVICE
            del decoded
        for j in part:
            if j not in images:
                try:
                    picture = decode_image(encoded[j], self.images.max_pixels)
                except SampleError as exc:
                    errors[j] = exc
                    continue
                images[j] = torch.from_numpy(np.array(picture)).permute(2, 0, 1).to(device)
        views = {j: oriented(images[j], orientations[j]) for j in part if j in images}
        detected = detect(self._detector, list(views.values()), self.images.face_threshold,
                          self.images.max_faces, self.images.min_face_size)
        sources, first = [], len(crops)
        for (j, view), f in zip(views.items(), detected, strict=True):
            height, width = view.shape[1:]
            faces[j] = (f.scores.cpu().numpy(), f.boxes.cpu().numpy(), f.keypoints.cpu().numpy())
            cut = face_crops(faces[j][1], width, height, self.images.margin)
            face_rows[j] = list(range(len(crops), len(crops) + len(cut)))
            sources += [j] * len(cut)
            crops += cut
        index = {j: k for k, j in enumerate(images)}
        return crop_decoded(list(images.values()), [index[j] for j in sources],
                            [orientations[j] for j in images],
                            np.asarray(crops[first:]).reshape(-1, 3), device)

    def decode_on_device(self, batch: dict[str, np.ndarray], rows: np.ndarray):
        """Decode, crop and resize ``rows`` of a ``decode="gpu"`` batch on the model's device.

        Returns ``(pixels, errors, paths)``: uint8 (len(rows), 224, 224, 3) on the device,
        ``{position in rows: (row, SampleError)}`` for images no decoder could read, and each
        row's ``device_decode`` value (``"ok"``, or why it took the CPU path). JPEGs go through
        ``decode_crop_resize`` (nvJPEG on CUDA), a part of the memory budget at a time; the
        rest, and any it could not decode, through the CPU path (PIL) with the same crop."""
        import torch

        encoded = [batch["encoded"][r] for r in rows]
        device = np.flatnonzero(np.asarray(batch["on_device"])[rows])
        pixels = torch.zeros((len(rows), INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.uint8,
                             device=self.runner.device)
        paths = np.full(len(rows), FORMAT, dtype=object)
        if len(device):
            picked = rows[device]
            decoded, failed = decode_crop_resize(
                [encoded[j] for j in device], batch["orientation"][picked],
                batch["crop"][picked], self.runner.device,
                stored_sizes=batch["stored_size"][picked])
            pixels[torch.from_numpy(device).to(pixels.device)] = decoded
            paths[device] = DECODED_ON_DEVICE
            for k, reason in failed.items():
                paths[device[k]] = reason
        errors = {}
        for j in np.flatnonzero(paths != DECODED_ON_DEVICE):
            try:
                image = decode_image(bytes(encoded[j]), self.images.max_pixels)
                cpu = crop_and_resize(image, tuple(batch["crop"][rows[j]]))
                pixels[j] = torch.from_numpy(np.require(cpu, requirements=["W"])).to(
                    pixels.device)
            except SampleError as exc:
                errors[int(j)] = (int(rows[j]), exc)
            except Exception as exc:  # a decoder bug costs one sample, not the batch
                errors[int(j)] = (int(rows[j]), SampleError(
                    f"unexpected {exc.__class__.__name__} while decoding: {exc}"))
        return pixels, errors, paths
