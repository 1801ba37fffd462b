"""Decode JPEG batches where it is cheapest: nvJPEG on the GPU, with the CPU path's exact geometry.

The CPU path (``preprocess.preprocess``) decodes with PIL, applies the EXIF orientation, cuts
the crop square (black outside the image) and resizes it to 224x224. This module does the same
on a torch device, in two halves, so that only the encoded bytes travel to the GPU actor:

* ``probe(data, max_pixels) -> Probe`` and ``probe_and_crop(data, bbox, margin, max_pixels) ->
  (Probe, crop)``, in the CPU read task: the header only (PIL ``Image.open`` without ``load()``
  and a walk over the JPEG markers up to the first scan). They give the stored and the
  EXIF-oriented size and the crop ``(x0, y0, side)`` exactly as ``preprocess`` computes it,
  raise ``SampleError`` with the CPU path's kinds and messages for empty, unreadable and
  oversized images and bad boxes, and say whether the device may decode the bytes
  (``Probe.device_decodable``, ``device_decode_problem``: 8-bit Huffman baseline or
  progressive JPEG, grey or YCbCr, chroma 4:4:4 / 4:2:2 / 4:4:0 / 4:2:0, not cut short).
  Anything else (PNG, PPM, CMYK, arithmetic-coded, truncated, ...) takes the CPU path.
* ``decode_crop_resize(encoded, orientations, crops, device, size, stored_sizes) ->
  (pixels, failed)``, in the predictor actor: batched ``torchvision.io.decode_jpeg(list,
  device=...)`` calls (nvJPEG on CUDA, libjpeg-turbo on CPU), each holding at most
  ``decode_budget(device)`` stored pixels (a share of the device memory free when the call
  starts), so a batch of large photos is decoded a part at a time. A call that fails (one bad
  image fails the whole list, on either device; or out of memory) is split in halves and each
  half retried, so k bad images cost ~2k log n calls instead of one call per image; the images
  that fail alone come back in ``failed`` with the reason (``FALLBACK_REASONS``) for the CPU
  path, with those the header check rejects. Before each call the caller's CUDA stream is
  drained (``_order_streams``: nvJPEG may otherwise write into memory queued kernels still
  read). Then the crop and resize reproduce ``preprocess.crop_and_resize``
  step by step: black padding to whole boxes and PIL's ``reduce(f)`` box average (its fixed-
  point rounding included) when ``f = int(side / 224) >= 2``, then PIL's affine BILINEAR
  sampling (pixel-centre mapping, edge clamping, black where a sample point falls outside the
  image, truncation to uint8) in float64 and in PIL's order of operations. The EXIF
  orientation is a transposed view of the decoded image plus mirrored sample indices, so no
  pixels move for it; per image only the window the crop touches is copied (and box-averaged:
  a few small tensor ops), and the sampling runs on up to 64 images at once.

How close this path's pixels and landmarks are to the CPU path's, and how that was measured:
``docs/architecture.md`` ("Device decoding: how close to the CPU path"); the tests hold the
bounds (``tests/support/helpers.py``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from pipeline.model.geometry import INPUT_SIZE
from pipeline.stages.preprocess import (
    DEFAULT_MARGIN,
    DEFAULT_MAX_PIXELS,
    crop_square,
    image_errors,
    open_image,
    validate_bbox,
)

ORIENTATION_TAG = 0x0112


# EXIF orientation -> (transpose, flip x, flip y), applied in that order: the same pixels as
# PIL's ImageOps.exif_transpose (2 FLIP_LEFT_RIGHT, 3 ROTATE_180, 4 FLIP_TOP_BOTTOM,
# 5 TRANSPOSE, 6 ROTATE_270, 7 TRANSVERSE, 8 ROTATE_90).
_ORIENT = {
    1: (False, False, False),
    2: (False, True, False),
    3: (False, True, True),
    4: (False, False, True),
    5: (True, False, False),
    6: (True, True, False),
    7: (True, True, True),
    8: (True, False, True),
}
_DEVICE_SOF = {0xC0, 0xC2}  # baseline, progressive (Huffman-coded)
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Luma sampling factors nvJPEG decodes (chroma at 1x1): 4:4:4, 4:2:2, 4:4:0, 4:2:0.
_LUMA_SAMPLING = {(1, 1), (2, 1), (1, 2), (2, 2)}
# Images resampled together: bounds the float64 temporaries (~1.2 MB per image each).
_CHUNK = 64

# Why an image was not decoded on the device and took the CPU path (PIL) instead; the predictor
# counts them per reason for the summary, the manifest and the progress line.
FORMAT = "format"                # the header says the device decoder cannot take it (PNG, CMYK,
#                                  arithmetic-coded, cut short, ...): known in the read task
DECODER_ERROR = "decoder_error"  # the decoder refused it, alone
OUT_OF_MEMORY = "out_of_memory"  # the device had no memory for it, alone
SIZE_MISMATCH = "size_mismatch"  # it decoded to another size or channel count than its header
NO_DEVICE_DECODER = "no_device_decoder"  # this torchvision cannot decode on the device at all
FALLBACK_REASONS = (FORMAT, DECODER_ERROR, OUT_OF_MEMORY, SIZE_MISMATCH, NO_DEVICE_DECODER)

# How many stored pixels one decode call may hold on a CUDA device: this share of the memory
# free to PyTorch when the call starts (the driver's free memory plus the allocator's cached
# blocks), at this many bytes per pixel: 3 for the RGB output and up to 3 for the decoder's
# own planes (4:4:4). An estimate, not a measurement: a call that still runs out of memory is
# split and retried. Each of an actor's threads takes its share of what is free at the time.
DECODE_MEMORY_SHARE = 0.25
DECODE_BYTES_PER_PIXEL = 6
MIN_DECODE_PIXELS = 16 << 20  # never less than a 16 MP photo's worth (it goes alone anyway)
CPU_DECODE_PIXELS = 64 << 20  # on the CPU: ~200 MB of decoded RGB per call


@dataclass(frozen=True)
class Probe:
    """What the header says about one encoded image."""

    format: str             # PIL's format name: "JPEG", "MPO", "PNG", "PPM", ...
    width: int              # stored size, before the EXIF orientation
    height: int
    orientation: int        # EXIF orientation 1..8 (1 when absent or not one of those)
    device_decodable: bool  # torchvision's decode_jpeg (nvJPEG) takes it on any device
    reason: str = ""        # why not, when not device-decodable

    @property
    def oriented_width(self) -> int:
        return self.height if _ORIENT[self.orientation][0] else self.width

    @property
    def oriented_height(self) -> int:
        return self.width if _ORIENT[self.orientation][0] else self.height


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Probe:
    """Read the header of ``data`` without decoding pixels.

    Raises ``SampleError`` as ``preprocess.decode_image`` does (``empty``, ``too_large``,
    ``decode``) for what the header already shows; errors that only decoding reveals (a
    truncated JPEG, a broken PNG CRC) come from the CPU fallback, since such images are not
    ``device_decodable``. For JPEG, WebP and TIFF the EXIF block sits in the header; a PNG may
    keep it after the pixels, so PIL decodes a PNG to look for it.
    """
    with image_errors(), open_image(data, max_pixels) as image:
        width, height = image.size
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
        fmt = image.format or ""
    try:  # exif_transpose looks the value up in a dict: anything else means "no transpose"
        orientation = int(orientation) if orientation in _ORIENT else 1
    except TypeError:
        orientation = 1
    # MPO (a JPEG with more frames appended): the first frame is a plain JPEG stream.
    reason = device_decode_problem(data) if fmt in ("JPEG", "MPO") else f"{fmt} is not JPEG"
    return Probe(fmt, width, height, orientation, not reason, reason)


def probe_and_crop(
    data: bytes,
    bbox: Sequence[float] | None = None,
    margin: float = DEFAULT_MARGIN,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[Probe, tuple[float, float, float]]:
    """``probe`` + the crop ``preprocess`` would use: ``(probe, (x0, y0, side))``.

    Validates ``bbox`` against the oriented size like ``preprocess`` (``SampleError``
    ``bad_bbox``); the size of the output row is ``(probe.oriented_width, .oriented_height)``.
    """
    info = probe(data, max_pixels)
    width, height = info.oriented_width, info.oriented_height
    if bbox is not None:
        bbox = validate_bbox(bbox, width, height)
    return info, crop_square(width, height, bbox, margin)


def device_decode_problem(data: bytes) -> str:
    """Why torchvision's ``decode_jpeg`` on CUDA (nvJPEG) should not get ``data``; "" if it may.

    From the JPEG markers before the first scan: 8-bit Huffman baseline or progressive, grey
    or YCbCr (not CMYK/YCCK, not RGB-coded), chroma 4:4:4 / 4:2:2 / 4:4:0 / 4:2:0, and an
    end-of-image marker after the scan (entropy-coded data cannot hold FF D9, so its absence
    means the file was cut short: the CPU path reports that as a decode error, where a
    decoder on the device could return a half-grey image).
    """
    header = _jpeg_header(bytes(data))
    if header is None:
        return "not a JPEG stream (or unreadable JPEG markers)"
    sof, precision, sampling, _, adobe_transform, scan_at = header
    if sof not in _DEVICE_SOF:
        return f"JPEG process SOF{sof - 0xC0} (only baseline and progressive Huffman)"
    if precision != 8:
        return f"{precision}-bit JPEG"
    if len(sampling) == 3:
        if adobe_transform == 0:
            return "RGB-coded JPEG (Adobe transform 0)"
        if sampling[0] not in _LUMA_SAMPLING or sampling[1] != (1, 1) or sampling[2] != (1, 1):
            return f"chroma subsampling {sampling}"
    elif len(sampling) == 4:
        return "CMYK JPEG"
    elif len(sampling) != 1:
        return f"{len(sampling)}-component JPEG"
    if bytes(data).find(b"\xff\xd9", scan_at) < 0:
        return "truncated JPEG (no end-of-image marker)"
    return ""


def jpeg_pixels(data) -> int:
    """Stored pixels of a JPEG from its frame header (0 when the markers do not parse)."""
    header = _jpeg_header(_as_bytes(data))
    return 0 if header is None else header[3][0] * header[3][1]


def _jpeg_header(data: bytes):
    """``(SOF marker, precision, [(h, v) sampling per component], (width, height), Adobe
    transform or None, offset of the first scan)`` from the markers before the first scan, or
    None when they do not parse."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end, frame, adobe_transform = 2, len(data), None, None
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            return None
        body = data[pos + 4:pos + 2 + length]
        if marker in _SOF_MARKERS:
            if len(body) < 6 or len(body) < 6 + 3 * body[5]:
                return None
            sampling = [(body[7 + 3 * k] >> 4, body[7 + 3 * k] & 15) for k in range(body[5])]
            size = (int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big"))
            frame = (marker, body[0], sampling, size)
        elif marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
            adobe_transform = body[11]
        elif marker == 0xDA:
            return None if frame is None else (*frame, adobe_transform, pos)
        pos += 2 + length
    return None


def decode_crop_resize(
    encoded: Sequence[bytes | bytearray | memoryview | np.ndarray],
    orientations: Sequence[int] | np.ndarray,
    crops: np.ndarray,
    device="cpu",
    size: int = INPUT_SIZE,
    stored_sizes: np.ndarray | None = None,
    pixel_budget: int | None = None,
):
    """Decode JPEG bytes on ``device`` and cut each image's crop, resized to ``size`` x ``size``.

    ``encoded``: the image bytes (bytes-like or uint8 arrays); ``orientations``: EXIF
    orientation 1..8 per image; ``crops``: (N, 3) ``x0, y0, side`` in pixels of the oriented
    image (from ``probe_and_crop``); ``stored_sizes``: optional (N, 2) ``width, height``
    before orientation, as probed: an image that decodes to another size counts as failed.
    ``pixel_budget``: stored pixels decoded at once (default ``decode_budget(device)``); the
    decoded images of one part are freed before the next part is decoded.

    Returns ``(pixels, failed)``: a uint8 tensor (N, size, size, 3) on ``device``, equal to
    ``preprocess.crop_and_resize`` of the CPU path's image within the tests' tolerance, and
    ``{index: reason}`` (reasons from ``FALLBACK_REASONS``, sorted by index) for the images not
    decoded here, zeros in ``pixels``. The caller runs the CPU path for them.
    """
    import torch

    device = torch.device(device)
    count = len(encoded)
    pixels = torch.zeros((count, size, size, 3), dtype=torch.uint8, device=device)
    if count == 0:
        return pixels, {}
    crops = np.asarray(crops, dtype=np.float64).reshape(count, 3)
    orientations = [int(o) for o in orientations]
    if len(orientations) != count:
        raise ValueError(f"{count} images but {len(orientations)} orientations")
    for i, (orientation, crop) in enumerate(zip(orientations, crops, strict=True)):
        if orientation not in _ORIENT:
            raise ValueError(f"image {i}: EXIF orientation must be 1..8, got {orientation}")
        if not np.all(np.isfinite(crop)) or crop[2] <= 0:
            raise ValueError(f"image {i}: crop must be finite with side > 0, got {crop}")

    failed = {}
    budget = decode_budget(device) if pixel_budget is None else pixel_budget
    pixel_counts = ([jpeg_pixels(data) for data in encoded] if stored_sizes is None else
                    np.prod(np.asarray(stored_sizes, dtype=np.int64), axis=1).tolist())
    for part in budget_parts(pixel_counts, budget):
        decoded, refused = _decode([encoded[i] for i in part], device,
                                   None if stored_sizes is None else np.asarray(stored_sizes)[part])
        images, plans = {}, []
        for k, i in enumerate(part):
            image = decoded[k]
            if image is None:
                failed[i] = refused[k]
                continue
            images[i] = image
            plan = _plan(i, image.shape[2], image.shape[1], orientations[i], crops[i], size)
            if plan is not None:  # None: no sample point lands in the image, all black
                plans.append(plan)
        for start in range(0, len(plans), _CHUNK):
            _resample(images, plans[start:start + _CHUNK], pixels, size)
        del images, decoded  # this part's decoded images go before the next part's come
    return pixels, dict(sorted(failed.items()))


def decode_images(encoded, device="cpu", stored_sizes: np.ndarray | None = None):
    """Decode JPEG bytes on ``device`` in one call (split on failure, like
    ``decode_crop_resize``): ``(images, failed)``, stored (not oriented) uint8 (3, H, W)
    tensors, None for the indices in ``failed`` (``{index: reason}``; with ``stored_sizes``,
    (N, 2) ``width, height`` as probed, an image of another size is ``SIZE_MISMATCH``). The
    caller bounds the memory: ``budget_parts`` of ``decode_budget``."""
    import torch

    return _decode(encoded, torch.device(device), stored_sizes)


def decode_budget(device) -> int:
    """Stored pixels one decode call may hold on ``device`` (see ``DECODE_MEMORY_SHARE``)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return CPU_DECODE_PIXELS
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(MIN_DECODE_PIXELS,
               int((free + cached) * DECODE_MEMORY_SHARE / DECODE_BYTES_PER_PIXEL))


def budget_parts(pixels: Sequence[int], budget: int, max_count: int | None = None
                 ) -> list[list[int]]:
    """Consecutive indices of ``pixels`` cut into parts of at most ``budget`` pixels (and at
    most ``max_count`` images); an image larger than the budget is a part of its own."""
    parts, current, held = [], [], 0
    for i, n in enumerate(pixels):
        if current and (held + n > budget or (max_count and len(current) >= max_count)):
            parts.append(current)
            current, held = [], 0
        current.append(i)
        held += n
    if current:
        parts.append(current)
    return parts


def oriented(image, orientation: int):
    """A stored (3, H, W) image as displayed: its EXIF ``orientation`` applied (a view)."""
    transpose, flip_x, flip_y = _ORIENT[int(orientation)]
    view = image.transpose(1, 2) if transpose else image
    dims = [d for d, flip in ((2, flip_x), (1, flip_y)) if flip]
    return view.flip(dims) if dims else view


def crop_decoded(images, sources: Sequence[int], orientations, crops: np.ndarray, device,
                 size: int = INPUT_SIZE):
    """Crops of already decoded images, several per image if need be: crop ``k`` (``x0, y0,
    side`` in oriented pixels) of stored image ``images[sources[k]]`` with EXIF orientation
    ``orientations[sources[k]]``, resized to ``size`` as ``decode_crop_resize`` does. Returns
    a uint8 tensor (len(crops), size, size, 3) on ``device``."""
    import torch

    pixels = torch.zeros((len(sources), size, size, 3), dtype=torch.uint8,
                         device=torch.device(device))
    plans = []
    for k, (source, crop) in enumerate(zip(sources, np.asarray(crops, dtype=np.float64),
                                           strict=True)):
        image = images[source]
        plan = _plan(k, image.shape[2], image.shape[1], int(orientations[source]), crop, size)
        if plan is not None:
            plans.append(replace(plan, source=int(source)))
    for start in range(0, len(plans), _CHUNK):
        _resample(images, plans[start:start + _CHUNK], pixels, size)
    return pixels


def _as_bytes(data) -> bytes:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).tobytes()
    return bytes(data)


def _decode(encoded, device, stored_sizes=None):
    """Decoded (3, H, W) uint8 tensors on ``device`` (None where not decoded) and
    ``{index: reason}`` for those: refused by the header check, by a decoder that cannot work
    on this device, alone by the decoder, or decoded to another size or channel count than
    ``stored_sizes`` says (``width, height`` per image)."""
    import torch

    images, failed, todo = [None] * len(encoded), {}, []
    for i, data in enumerate(encoded):
        data = _as_bytes(data)
        if device_decode_problem(data):
            failed[i] = FORMAT
        else:
            todo.append((i, torch.frombuffer(bytearray(data), dtype=torch.uint8)))
    if todo and not device_decoder_works(device):
        failed.update((i, NO_DEVICE_DECODER) for i, _ in todo)
    elif todo:
        _decode_split(todo, device, images, failed)
    for i, image in enumerate(images):
        if image is not None and (image.shape[0] != 3 or (
                stored_sizes is not None and tuple(image.shape[1:]) != (
                    int(stored_sizes[i][1]), int(stored_sizes[i][0])))):
            images[i], failed[i] = None, SIZE_MISMATCH
    return images, failed


def _decode_split(todo, device, images, failed) -> None:
    """One batched decode of ``todo`` (``(index, bytes tensor)`` pairs); when it fails, the
    halves are retried: a bad image costs its neighbours ~2 log n calls, not n."""
    import torch

    try:
        decoded = _decode_call([tensor for _, tensor in todo], device)
    except Exception as exc:  # whatever the reason, smaller calls tell which image it was
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        if oom and device.type == "cuda":
            torch.cuda.empty_cache()
        if len(todo) == 1:
            failed[todo[0][0]] = OUT_OF_MEMORY if oom else DECODER_ERROR
            return
        half = len(todo) // 2
        _decode_split(todo[:half], device, images, failed)
        _decode_split(todo[half:], device, images, failed)
        return
    for (i, _), image in zip(todo, decoded, strict=True):
        images[i] = image


def _decode_call(tensors, device):
    """torchvision's batched ``decode_jpeg`` (nvJPEG on CUDA), after the caller's stream."""
    from torchvision.io import ImageReadMode, decode_jpeg

    _order_streams(device)
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still work.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def _order_streams(device) -> None:
    """Drain the caller's CUDA stream before nvJPEG writes. torchvision allocates the decoded
    images on the caller's stream, but nvJPEG's hardware decoder writes them on its own stream
    without waiting for that one (it only makes the caller wait afterwards): the caching
    allocator may hand it a block that kernels still queued on the caller's stream read (the
    previous part's crops and temporaries), and the decoder overwrites it: silently wrong
    faces. Seen on an H100 in 134-199 of 200 tries; draining the stream first made it 0 (see
    pytorch/vision#9606 and meta-pytorch/torchcodec#1634). Nothing to order on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.current_stream(device).synchronize()


# Per device: whether this torchvision decodes JPEGs there at all (tried once, on a tiny JPEG).
_decoder_works: dict[str, bool] = {}


def device_decoder_works(device) -> bool:
    """Whether torchvision's ``decode_jpeg`` works on ``device`` (a torchvision built without
    nvJPEG refuses every image there): tried once per device, on a tiny JPEG."""
    import logging

    import torch

    key = str(torch.device(device))
    if key not in _decoder_works:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (90, 120, 200)).save(buf, "JPEG")
        try:
            _decode_call([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)],
                         torch.device(device))
            _decoder_works[key] = True
        except Exception as exc:
            _decoder_works[key] = False
            logging.getLogger("pipeline").warning(
                "torchvision cannot decode JPEGs on %s (%s: %s): every image takes the CPU "
                "path, at CPU speed", key, type(exc).__name__, str(exc)[:200])
    return _decoder_works[key]


@dataclass
class _Plan:
    """Where one image's crop comes from: a window of the stored image, box-averaged by
    ``factor``, then sampled bilinearly at per-axis neighbours ``lo``/``hi`` with weights."""

    index: int                 # the output slot in ``pixels``
    transpose: bool
    rows: tuple[int, int]      # window of the (transposed if needed) stored image
    cols: tuple[int, int]
    pad: tuple[int, int, int, int]  # black (left, right, top, bottom) to whole boxes
    factor: int
    height: int                # window size after the box average
    width: int
    x: tuple[np.ndarray, ...]  # lo, hi, weight, valid along x (window coordinates)
    y: tuple[np.ndarray, ...]
    source: int = -1           # the decoded image it reads (-1: the one at ``index``)


def _axis(origin: float, scale: float, length: int, size: int):
    """PIL's affine BILINEAR sampling along one axis (Geometry.c), for a crop starting at
    ``origin`` in pixels of the (reduced) oriented image of ``length`` pixels: output pixel
    ``i`` samples ``scale * (i + 0.5) + origin``; outside ``[0, length)`` it is black, inside
    it blends the two nearest pixel centres, clamped to the edge.

    Returns ``(first, last, count, lo, hi, weight, valid)``, or None when no sample lands in
    the image: the span of pixels used and the neighbours relative to ``first``.
    """
    position = scale * (np.arange(size, dtype=np.float64) + 0.5) + origin
    valid = (position >= 0.0) & (position < length)
    if not valid.any():
        return None
    shifted = position - 0.5
    floor = np.floor(shifted)
    weight = shifted - floor
    lo = np.clip(floor, 0, length - 1).astype(np.int64)
    hi = np.clip(floor + 1, 0, length - 1).astype(np.int64)
    first, last = int(lo[valid].min()), int(hi[valid].max())
    lo = np.where(valid, lo, first) - first
    hi = np.where(valid, hi, first) - first
    return first, last, last + 1 - first, lo, hi, weight, valid


def _plan(index: int, width: int, height: int, orientation: int, crop, size: int):
    """Host-side geometry of one image (stored ``width`` x ``height``) for ``_resample``."""
    transpose, flip_x, flip_y = _ORIENT[orientation]
    if transpose:
        width, height = height, width  # now the oriented size
    x0, y0, side = (float(v) for v in crop)
    # Exactly preprocess.crop_and_resize's arithmetic.
    scale = side / size
    factor = int(scale)
    if factor >= 2:
        x0, y0, scale = x0 / factor, y0 / factor, scale / factor
    else:
        factor = 1
    spans = []
    for origin, length, flip in ((x0, width, flip_x), (y0, height, flip_y)):
        reduced = -(-length // factor)  # the CPU path pads with black to whole boxes
        axis = _axis(origin, scale, reduced, size)
        if axis is None:
            return None
        first, last, count, lo, hi, weight, valid = axis
        start, stop = first * factor, min((last + 1) * factor, length)
        short = count * factor - (stop - start)  # black beyond the image's far edge
        if flip:
            # The oriented axis runs backwards through the stored one: read the mirrored
            # span, put the padding before it, and mirror the sample indices instead of
            # the pixels.
            start, stop = length - stop, length - start
            pad = (short, 0)
            lo, hi = count - 1 - lo, count - 1 - hi
        else:
            pad = (0, short)
        spans.append(((start, stop), pad, count, (lo, hi, weight, valid)))
    (cols, pad_x, count_x, sample_x), (rows, pad_y, count_y, sample_y) = spans
    return _Plan(index, transpose, rows, cols, (*pad_x, *pad_y), factor, count_y, count_x,
                 sample_x, sample_y)


def _window(image, plan: _Plan):
    """The plan's window of ``image`` (3, H, W), box-averaged: uint8 (3, height, width)."""
    import torch

    view = image.transpose(1, 2) if plan.transpose else image
    window = view[:, plan.rows[0]:plan.rows[1], plan.cols[0]:plan.cols[1]]
    factor = plan.factor
    if factor == 1:
        return window
    window = torch.nn.functional.pad(window, plan.pad) if any(plan.pad) else window.contiguous()
    # Box sums, the contiguous axis first (far faster than one 5-D reduction on CPU).
    sums = window.reshape(3, plan.height * factor, plan.width, factor).sum(-1, dtype=torch.int32)
    sums = sums.reshape(3, plan.height, factor, plan.width).sum(2, dtype=torch.int64)
    # PIL's fixed-point box average (Reduce.c): (sum + f*f/2) * m >> 24 with
    # m = (uint32)(2**32 / (2**8 * f*f)) computed in float32 (not always the exact quotient).
    area = factor * factor
    multiplier = int(np.float32(4294967296.0) / np.float32(256 * area))
    return ((sums + area // 2) * multiplier) >> 24


def _resample(images, plans: list[_Plan], pixels, size: int) -> None:
    """Bilinear sampling of a chunk of images at once, written into ``pixels``."""
    import torch

    device = pixels.device
    count = len(plans)
    if count == 0:
        return
    height = max(p.height for p in plans)
    width = max(p.width for p in plans)
    windows = torch.zeros((count, 3, height, width), dtype=torch.uint8, device=device)
    for k, plan in enumerate(plans):
        source = plan.index if plan.source < 0 else plan.source
        windows[k, :, :plan.height, :plan.width] = _window(images[source], plan)

    def stacked(axis: str, part: int, dtype):
        values = np.stack([getattr(p, axis)[part] for p in plans])
        return torch.from_numpy(values.astype(dtype)).to(device, non_blocking=True)

    lo_x, hi_x = stacked("x", 0, np.int64), stacked("x", 1, np.int64)
    lo_y, hi_y = stacked("y", 0, np.int64), stacked("y", 1, np.int64)
    weight_x = stacked("x", 2, np.float64)[:, None, None, :]
    weight_y = stacked("y", 2, np.float64)[:, None, :, None]
    valid = stacked("y", 3, bool)[:, None, :, None] & stacked("x", 3, bool)[:, None, None, :]

    def rows(index):
        return windows.gather(2, index[:, None, :, None].expand(count, 3, size, width))

    def cols(source, index):
        picked = source.gather(3, index[:, None, None, :].expand(count, 3, size, size))
        return picked.to(torch.float64)

    top, bottom = rows(lo_y), rows(hi_y)
    # Horizontal blends of the two rows, then the vertical one, in PIL's order of operations
    # (v = a + (b - a) * d, in double), then truncation to uint8 and black outside the image.
    left, right = cols(top, lo_x), cols(top, hi_x)
    upper = left + (right - left) * weight_x
    left, right = cols(bottom, lo_x), cols(bottom, hi_x)
    lower = left + (right - left) * weight_x
    value = (upper + (lower - upper) * weight_y).floor_()
    value = torch.where(valid, value, torch.zeros((), dtype=value.dtype, device=device))
    index = torch.tensor([p.index for p in plans], device=device)
    pixels[index] = value.to(torch.uint8).permute(0, 2, 3, 1)
