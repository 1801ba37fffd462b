"""The read stage, free of Ray: read + preprocess shards into units of rows.

``pipeline.backend.executor`` runs them in Ray tasks and actors; tests call them directly. A unit's
rows are a dict of numpy arrays (which pieces of which shards they belong to is in the unit's
header, ``pipeline.stages.units``). The columns, what each holds between the stages and in the
files, are declared in ``pipeline.io.rows``.

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

The predictor drops the columns only the stages use (``rows.TRAVEL_ONLY``) and adds those it
makes (``landmarks``, ``model_version``).
"""

from __future__ import annotations

import contextlib
import json
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.config.errors import BadInput
from pipeline.io.rows import NO_FACE, empty_rows
from pipeline.io.shards import DEFAULT_MAX_IMAGE_BYTES, Sample, Shard, read_samples
from pipeline.model.geometry import INPUT_SIZE
from pipeline.stages.detect import (
    DETECT_MODES,
    FaceFinder,
    FoundFace,
    ImageSettings,
    needs_detection,
)
from pipeline.stages.faults import FaultPlan
from pipeline.stages.gpu_decode import Probe, probe_and_crop
from pipeline.stages.preprocess import (
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
# What a unit may hold: rows, and bytes of pixels (decode="cpu") or encoded images ("gpu").
DEFAULT_UNIT_BYTES = 256 << 20


# The bytes of a row's arrays besides pixels or encoded image (key, boxes, points, meta):
# what an error row weighs when images travel encoded (--decode gpu).
ROW_BYTES = 256


PIXEL_BYTES = INPUT_SIZE * INPUT_SIZE * 3  # one row's model input (decode="cpu")


# What the read stage made of one sample: one record per case. Each knows how many output rows
# the sample becomes, what it weighs in its unit, and how it fills its rows' own columns (the
# columns every row has, key, shard, meta and bbox, are the reader's).
@dataclass(frozen=True)
class ErrorRow:
    """A sample that is an error row: its own (read, sidecar) or its decoding's."""

    error: str
    kind: str
    rows = 1

    def weight(self, decode: str) -> int:  # a row's pixels are zeros on error rows
        return PIXEL_BYTES if decode == "cpu" else ROW_BYTES

    def fill(self, out: dict[str, np.ndarray], i: int) -> None:
        out["error"][i], out["error_kind"][i] = self.error, self.kind


@dataclass(frozen=True)
class Decoded:
    """``decode="cpu"``: the model input, cut and resized here."""

    pixels: np.ndarray
    width: int
    height: int
    crop: tuple[float, float, float]
    rows = 1

    def weight(self, decode: str) -> int:
        return PIXEL_BYTES

    def fill(self, out: dict[str, np.ndarray], i: int) -> None:
        out["pixels"][i] = self.pixels
        out["width"][i], out["height"][i] = self.width, self.height
        out["crop"][i] = self.crop


@dataclass(frozen=True)
class FacesFound:
    """``decode="cpu"``: what the detector found in the image, one row per face; no face is
    one ``no_face`` row (``error`` says what was searched for)."""

    width: int
    height: int
    faces: list[FoundFace]
    no_face: str

    @property
    def rows(self) -> int:
        return max(1, len(self.faces))

    def weight(self, decode: str) -> int:
        return PIXEL_BYTES * self.rows

    def fill(self, out: dict[str, np.ndarray], i: int) -> None:
        out["width"][i:i + self.rows], out["height"][i:i + self.rows] = self.width, self.height
        if not self.faces:
            out["error"][i], out["error_kind"][i] = self.no_face, NO_FACE
        for k, face in enumerate(self.faces, start=i):
            out["pixels"][k], out["crop"][k] = face.pixels, face.crop
            out["face"][k], out["face_score"][k] = k - i, face.score
            out["face_box"][k], out["face_points"][k] = face.box, face.keypoints


@dataclass(frozen=True)
class Encoded:
    """``decode="gpu"``: the image file's bytes for the predictor to decode, with what its
    header says; ``crop`` None: the predictor finds the faces (and so the crops) itself."""

    info: Probe
    data: bytes
    crop: tuple[float, float, float] | None
    rows = 1

    def weight(self, decode: str) -> int:
        return len(self.data)

    def fill(self, out: dict[str, np.ndarray], i: int) -> None:
        info = self.info
        out["encoded"][i] = self.data
        out["orientation"][i] = info.orientation
        out["stored_size"][i] = info.width, info.height
        out["on_device"][i] = info.device_decodable
        out["width"][i], out["height"][i] = info.oriented_width, info.oriented_height
        if self.crop is None:
            out["find_faces"][i] = True
        else:
            out["crop"][i] = self.crop


Prepared = ErrorRow | Decoded | FacesFound | Encoded


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


@dataclass(frozen=True)
class ReaderSettings:
    """What a read task needs, built once from the job's config (``pipeline.inference.job``)
    and handed to every read task as it is.

    A unit closes at ``unit_rows`` rows or ``unit_bytes`` bytes, and its header maps its rows
    to output pieces of ``rows_per_file`` rows. ``beat_bytes`` / ``beat_rows``: how much input a
    read task passes over (rows it does not process: a resumed shard's done pieces, the rows
    before a slice) between two ``Beat``s when ``read_task`` is asked for them."""

    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    images: ImageSettings = ImageSettings()
    decode: str = "cpu"
    detect: str = "never"
    image_column: str = "image"
    key_column: str = "key"
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    unit_rows: int = 32
    unit_bytes: int = DEFAULT_UNIT_BYTES
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    beat_bytes: int = BEAT_BYTES
    beat_rows: int = BEAT_ROWS
    faults: str = ""

    def __post_init__(self):
        if self.decode not in DECODE_MODES:
            raise BadInput(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if self.detect not in DETECT_MODES:
            raise BadInput(f"detect must be one of {DETECT_MODES}, got {self.detect!r}")


class ShardReader:
    """The read stage: stream the shards of a read task and yield units of preprocessed rows.

    ``read_task`` yields ``(UnitHeader, rows)`` per unit (``pipeline.stages.units``). Rows of
    pieces a task says to skip are read past (a tar has to be) but neither decoded nor sent on.
    """

    def __init__(self, settings: ReaderSettings = ReaderSettings()):
        self.settings = s = settings
        self.decode, self.detect, self.images = s.decode, s.detect, s.images
        self.finder = FaceFinder(s.images.face_threshold, s.images.max_faces,
                                 s.images.min_face_size, s.images.margin)
        self.rows_per_file = s.rows_per_file
        self.beat_bytes, self.beat_rows = max(1, s.beat_bytes), max(1, s.beat_rows)
        self.faults = FaultPlan(s.faults)

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
        builder = UnitBuilder(task.index, self.rows_per_file, self.settings.unit_rows,
                              self.settings.unit_bytes)
        pending: list[tuple[str, Sample, str, Prepared]] = []

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
                if builder.add(i, row, is_last, prepared.weight(self.decode),
                               out_rows=prepared.rows):
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
        s = self.settings
        samples = read_samples(shard, s.storage_options, s.image_column, s.key_column,
                               s.max_image_bytes)

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

    def _prepare(self, sample: Sample) -> Prepared:
        if sample.error:
            return ErrorRow(sample.error, sample.error_kind or "invalid")
        if sample.meta_error:
            return ErrorRow(sample.meta_error, "bad_sidecar")
        bbox = (sample.meta or {}).get("bbox")
        find = needs_detection(self.detect, bbox)
        try:
            if self.decode == "gpu":
                info, crop = probe_and_crop(sample.data, None if find else bbox,
                                            self.images.margin, self.images.max_pixels)
                return Encoded(info, sample.data, None if find else crop)
            if find:
                image = decode_image(sample.data, self.images.max_pixels)
                return FacesFound(*image.size, self.finder(image), self.images.no_face())
            return Decoded(*preprocess(sample.data, bbox, self.images.margin,
                                       self.images.max_pixels))
        except SampleError as exc:
            return ErrorRow(str(exc), exc.kind)
        except Exception as exc:  # a decoder bug must cost one sample, not the shard
            return ErrorRow(f"unexpected {exc.__class__.__name__} while decoding: {exc}",
                            "invalid")

    def _to_batch(self, rows: list[tuple[str, Sample, str, Prepared]]
                  ) -> dict[str, np.ndarray]:
        out = empty_rows(sum(p.rows for *_, p in rows), self.decode)
        i = 0
        for uri, sample, meta, prepared in rows:
            bbox = (sample.meta or {}).get("bbox")
            for k in range(i, i + prepared.rows):  # what every row of the sample has
                out["key"][k], out["shard"][k], out["meta"][k] = sample.key, uri, meta
                if isinstance(bbox, (list, tuple)) and len(bbox) == 4:
                    with contextlib.suppress(TypeError, ValueError):  # bad: a bad_bbox row
                        out["bbox"][k] = np.asarray(bbox, dtype=np.float32)
            prepared.fill(out, i)
            i += prepared.rows
        return out
