"""The read stage, free of Ray: read + preprocess shards into units of rows.

``pipeline.backend.executor`` runs them in Ray tasks and actors; tests call them directly. A unit's
rows are a dict of numpy arrays (which pieces of which shards they belong to is in the unit's
header, ``pipeline.stages.units``). Between the stages the rows carry:

=========== ==================== ===============================================================
column      dtype / shape        meaning
=========== ==================== ===============================================================
key         str                  sample key ("" for a shard-level error row)
shard       str                  input shard URI
width       int32                oriented image width (0 when unknown)
height      int32                oriented image height (0 when unknown)
bbox        float32 (4,)         sidecar face box, NaN when none
face        int16                the face's index in its image, by descending score (0 when
                                 the image was not searched for faces, or none was found)
face_score  float32              the detector's score, NaN when not detected
face_box    float32 (4,)         the detector's box, NaN when not detected
face_points float32 (5, 2)       the detector's 5 keypoints, NaN when not detected
crop        float64 (3,)         square crop ``x0, y0, side`` in source pixels
meta        str                  sidecar JSON ("" when none)
error       str                  what went wrong ("" when fine)
error_kind  str                  one of ``preprocess.ERROR_KINDS`` ("" when fine)
pixels      uint8 (224, 224, 3)  the model input, zeros on error rows (``decode="cpu"`` only)
encoded     bytes                the image file's bytes (``decode="gpu"`` only)
orientation int8                 its EXIF orientation 1..8 (``decode="gpu"`` only)
stored_size int32 (2,)           its width, height before orientation (``decode="gpu"`` only)
on_device   bool                 the device decoder takes it (``decode="gpu"`` only)
find_faces  bool                 the predictor finds the faces (``decode="gpu"`` only)
=========== ==================== ===============================================================

With ``decode="cpu"`` the read task decodes, crops and resizes (PIL); a sample without a face box
(``--detect auto``) or every sample (``always``) goes through the face detector there
(``pipeline.stages.detect``) and becomes one row per face found, or one ``no_face`` error row.
With ``decode="gpu"`` it
only reads each image's header (``gpu_decode.probe_and_crop``: size, EXIF orientation, crop)
and sends the encoded bytes on, so a batch weighs ~50 KB per 640x480 JPEG instead of 150 KB of
pixels; the predictor decodes the unit on its device (nvJPEG on CUDA) and crops and resizes
there (``gpu_decode.decode_crop_resize``). Images the device decoder does not take (PNG, CMYK
JPEG, ...) or fails on are decoded by the CPU path inside the predictor, one by one. A sample
to search for faces goes as its bytes with ``find_faces`` set and no crop: the predictor decodes
it once on its device, detects there and cuts each face's crop from that decoded image, and
returns one row per face (``pipeline.stages.predictor``).

The predictor drops ``pixels`` / ``encoded`` / ``orientation`` / ``stored_size`` and adds
``landmarks`` (float32 (68, 2), NaN on error rows) and ``model_version``.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.config.errors import BadInput
from pipeline.io.shards import DEFAULT_MAX_IMAGE_BYTES, Sample, Shard, read_samples
from pipeline.model.geometry import INPUT_SIZE
from pipeline.stages.detect import (
    DEFAULT_FACE_THRESHOLD,
    DEFAULT_MAX_FACES,
    DEFAULT_MIN_FACE_SIZE,
    DETECT_MODES,
    FaceFinder,
    FoundFace,
    needs_detection,
    no_face_error,
)
from pipeline.stages.faults import FaultPlan
from pipeline.stages.gpu_decode import probe_and_crop
from pipeline.stages.preprocess import (
    DEFAULT_MARGIN,
    DEFAULT_MAX_PIXELS,
    SampleError,
    decode_image,
    preprocess,
)
from pipeline.stages.units import (
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
DEVICE_DECODE_COLUMNS = ("encoded", "orientation", "stored_size", "on_device", "find_faces")
# What a unit may hold: rows, and bytes of pixels (decode="cpu") or encoded images ("gpu").
DEFAULT_UNIT_BYTES = 256 << 20


# The bytes of a row's arrays besides pixels or encoded image (key, boxes, points, meta):
# what an error row weighs when images travel encoded (--decode gpu).
ROW_BYTES = 256


def empty_rows(n: int, decode: str = "cpu") -> dict[str, np.ndarray]:
    rows = {
        "key": np.empty(n, dtype=object),
        "shard": np.empty(n, dtype=object),
        "width": np.zeros(n, dtype=np.int32),
        "height": np.zeros(n, dtype=np.int32),
        "bbox": np.full((n, 4), np.nan, dtype=np.float32),
        "face": np.zeros(n, dtype=np.int16),
        "face_score": np.full(n, np.nan, dtype=np.float32),
        "face_box": np.full((n, 4), np.nan, dtype=np.float32),
        "face_points": np.full((n, 5, 2), np.nan, dtype=np.float32),
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
        rows["find_faces"] = np.zeros(n, dtype=bool)
    else:
        rows["pixels"] = np.zeros((n, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    return rows


class _Detected:
    """What the detector made of one image: its size and its faces (none: a no_face row)."""

    def __init__(self, width: int, height: int, faces: list[FoundFace], finder: FaceFinder):
        self.width, self.height, self.faces = width, height, faces
        self.error = "" if faces else no_face_error(finder.threshold, finder.min_size)


class _FindOnDevice:
    """A sample the predictor searches for faces on its device (``decode="gpu"``)."""

    def __init__(self, info, data: bytes):
        self.info, self.data = info, data


def _meta_json(sample: Sample) -> str:
    """The sidecar as JSON for the ``meta`` column ("" when none); a sidecar that has no JSON
    form costs this sample (``bad_sidecar``), not the shard."""
    if not sample.meta:
        return ""
    try:
        return json.dumps(sample.meta, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        sample.meta_error = f"the sidecar cannot be written as JSON: {exc}"
        return ""


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


# A read task passing over input it does not process says so at least this often. A beat is one
# small object to the node agent (well under a millisecond); 16 archive images are megabytes.
BEAT_BYTES = 16 << 20
BEAT_ROWS = 16


@dataclass(frozen=True)
class Beat:
    """A read task's sign of life while it passes over rows without making a unit: ``rows``
    rows (``bytes`` bytes of input) of ``shard`` passed over since the last, up to ``row``."""

    shard: str
    row: int
    rows: int
    bytes: int


class ShardReader:
    """The read stage: stream the shards of a read task and yield units of preprocessed rows.

    ``read_task`` yields ``(UnitHeader, rows)`` per unit (``pipeline.stages.units``): a unit closes
    at ``unit_rows`` rows or ``unit_bytes`` bytes, and its header maps its rows to output pieces of
    ``rows_per_file`` rows. Rows of pieces a task says to skip are read past (a tar has to be) but
    neither decoded nor sent on.
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
        detect: str = "never",
        max_faces: int = DEFAULT_MAX_FACES,
        min_face_size: float = DEFAULT_MIN_FACE_SIZE,
        face_threshold: float = DEFAULT_FACE_THRESHOLD,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        beat_bytes: int = BEAT_BYTES,
        beat_rows: int = BEAT_ROWS,
    ):
        """``beat_bytes`` / ``beat_rows``: how much input a read task passes over (rows it does
        not process: a resumed shard's done pieces, the rows before a slice) between two
        ``Beat``s when ``read_task`` is asked for them."""
        if decode not in DECODE_MODES:
            raise BadInput(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        if detect not in DETECT_MODES:
            raise BadInput(f"detect must be one of {DETECT_MODES}, got {detect!r}")
        self.decode, self.detect = decode, detect
        self.finder = FaceFinder(face_threshold, max_faces, min_face_size, margin)
        self.storage_options = dict(storage_options or {})
        self.margin = margin
        self.max_pixels = max_pixels
        self.image_column = image_column
        self.key_column = key_column
        self.unit_rows = unit_rows
        self.rows_per_file = rows_per_file
        self.max_image_bytes = max_image_bytes
        self.beat_bytes, self.beat_rows = max(1, beat_bytes), max(1, beat_rows)
        self.unit_bytes = unit_bytes
        self.faults = FaultPlan(faults)

    def read(self, shard: Shard) -> Iterator[dict[str, np.ndarray]]:
        """The rows of one whole shard, in units (without their headers)."""
        for _, rows in self.read_task(ReadTask(0, (ShardTask(shard),))):
            yield rows

    def read_task(self, task: ReadTask, beats: bool = False
                  ) -> Iterator[tuple[UnitHeader, dict[str, np.ndarray]] | Beat]:
        """Yield the task's units in order; every row of every shard is in exactly one. With
        ``beats``, also a ``Beat`` for every ``beat_bytes`` (or ``beat_rows``) of input passed
        over without a unit: the stall watchdog's sign that a read task streaming past the done
        pieces of a huge resumed shard is moving (progress is input read, not units made).
        Where beats fall depends only on the input, so a retried read task yields the same
        sequence (its consumer may have taken part of it already)."""
        builder = UnitBuilder(task.index, self.rows_per_file, self.unit_rows, self.unit_bytes)
        pending: list[tuple[str, Sample, str, Any]] = []

        def unit() -> tuple[UnitHeader, dict[str, np.ndarray]]:
            header = builder.flush()
            header.input_bytes = sum(len(s.data) for _, s, _, _ in pending if s.data)
            return header, self._to_batch(pending)

        for i, item in enumerate(task.shards):
            rows = 0
            for row, sample, is_last in self._shard_rows(item):
                if sample is None:  # passed over: ``row`` is a Beat
                    if beats:
                        yield row
                    continue
                self.faults.at_read(item.shard.name, row, builder.units)
                meta = _meta_json(sample)
                prepared = self._prepare(sample)
                pending.append((item.shard.uri, sample, meta, prepared))
                rows += 1
                if builder.add(i, row, is_last, self._weight(prepared),
                               out_rows=self._out_rows(prepared)):
                    yield unit()
                    pending = []
            if rows == 0 and not item.skip and not (item.rows and item.rows[0]):
                builder.empty_shard(i)  # (once: by the task that reads the shard's row 0)
        if builder.pending():
            yield unit()

    def _shard_rows(self, item: ShardTask) -> Iterator[tuple[int | Beat, Sample | None, bool]]:
        """``(row, sample, is_last_row)`` of the rows to process, reading one sample ahead so
        the last row is known as such. A shard that stops part-way ends with an error row.
        A slice (``item.rows``) streams the rows before its own without decoding them (the
        duplicate-key check still sees them) and stops after its last. Rows passed over come
        as ``(Beat, None, False)`` every ``beat_bytes`` / ``beat_rows`` of them."""
        shard = item.shard
        start, stop = item.rows or (0, None)
        samples = read_samples(shard, self.storage_options, self.image_column, self.key_column,
                               self.max_image_bytes)

        def fetch() -> tuple[Sample | None, Exception | None]:
            try:
                return next(samples), None
            except StopIteration:
                return None, None
            except Exception as exc:  # the shard itself is broken: keep what came before
                return None, exc

        first_seen: dict[str, int] = {}
        row = passed_rows = passed_bytes = 0
        current, error = fetch()
        while current is not None and (stop is None or row < stop):
            following, error = fetch()
            if current.key in first_seen and not current.error:
                current.error = (f"duplicate key {current.key!r}: first seen at row "
                                 f"{first_seen[current.key]} of this shard")
                current.error_kind = "duplicate_key"
            first_seen.setdefault(current.key, row)
            if row >= start and row // self.rows_per_file not in item.skip:
                yield row, current, following is None and error is None
            else:
                self.faults.at_pass()
                passed_rows += 1
                passed_bytes += len(current.data or b"")
                if passed_rows >= self.beat_rows or passed_bytes >= self.beat_bytes:
                    yield Beat(item.shard.name, row, passed_rows, passed_bytes), None, False
                    passed_rows = passed_bytes = 0
            row += 1
            current = following
        if error is not None and current is None:
            # The error row goes into the first piece still to do from here on (a piece done
            # before was complete: its rows are all there), in the slice that holds that row.
            piece = row // self.rows_per_file
            while piece in item.skip:
                piece += 1
            at = max(row, piece * self.rows_per_file)
            if start <= at and (stop is None or at < stop):
                yield at, _shard_error(error, row), True

    def _prepare(self, sample: Sample):
        if sample.error or sample.meta_error:
            return None
        bbox = (sample.meta or {}).get("bbox")
        try:
            if needs_detection(self.detect, bbox) and self.decode == "gpu":
                info, _ = probe_and_crop(sample.data, None, self.margin, self.max_pixels)
                return _FindOnDevice(info, sample.data)
            if needs_detection(self.detect, bbox):
                image = decode_image(sample.data, self.max_pixels)
                return _Detected(*image.size, self.finder(image), self.finder)
            if self.decode == "gpu":
                info, crop = probe_and_crop(sample.data, bbox, self.margin, self.max_pixels)
                return info, crop, sample.data
            return preprocess(sample.data, bbox, self.margin, self.max_pixels)
        except SampleError as exc:
            return exc
        except Exception as exc:  # a decoder bug must cost one sample, not the shard
            return SampleError(f"unexpected {exc.__class__.__name__} while decoding: {exc}")

    @staticmethod
    def _out_rows(prepared) -> int:
        """Output rows a sample becomes: one per face found, else one."""
        return max(1, len(prepared.faces)) if isinstance(prepared, _Detected) else 1

    def _weight(self, prepared) -> int:
        """Bytes a sample adds to its unit: the pixel arrays of its rows (one per face; an
        error or ``no_face`` row holds zeroed pixels too), or its encoded image."""
        if self.decode == "cpu":
            return INPUT_SIZE * INPUT_SIZE * 3 * self._out_rows(prepared)
        if isinstance(prepared, _FindOnDevice):
            return len(prepared.data)
        if prepared is None or isinstance(prepared, Exception):
            return ROW_BYTES
        return len(prepared[2])

    def _to_batch(self, rows: list[tuple[str, Sample, str, Any]]) -> dict[str, np.ndarray]:
        out = empty_rows(sum(self._out_rows(p) for *_, p in rows), self.decode)
        i = 0
        for uri, sample, meta, prepared in rows:
            if isinstance(prepared, _Detected) and prepared.faces:
                for k, face in enumerate(prepared.faces):  # one row per face
                    self._fill(out, i, uri, sample, meta,
                               (face.pixels, prepared.width, prepared.height, face.crop))
                    out["face"][i], out["face_score"][i] = k, face.score
                    out["face_box"][i], out["face_points"][i] = face.box, face.keypoints
                    i += 1
            else:
                self._fill(out, i, uri, sample, meta, prepared)
                i += 1
        return out

    def _fill(self, out: dict[str, np.ndarray], i: int, uri: str, sample: Sample, meta: str,
              prepared) -> None:
        out["key"][i] = sample.key
        out["shard"][i] = uri
        out["meta"][i] = meta
        bbox = (sample.meta or {}).get("bbox")
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
        elif isinstance(prepared, _Detected):  # searched, and no face found
            out["error"][i], out["error_kind"][i] = prepared.error, "no_face"
            out["width"][i], out["height"][i] = prepared.width, prepared.height
        elif self.decode == "gpu":
            find = isinstance(prepared, _FindOnDevice)  # its crop is known once faces are found
            info, crop, data = (prepared.info, None, prepared.data) if find else prepared
            out["encoded"][i] = data
            out["orientation"][i] = info.orientation
            out["stored_size"][i] = info.width, info.height
            out["on_device"][i] = info.device_decodable
            out["width"][i], out["height"][i] = info.oriented_width, info.oriented_height
            if find:
                out["find_faces"][i] = True
            else:
                out["crop"][i] = crop
        else:
            pixels, width, height, crop = prepared
            out["pixels"][i] = pixels
            out["width"][i], out["height"][i] = width, height
            out["crop"][i] = crop
