"""Decode, crop and resize one image; map model outputs back to source pixels.

The crop is a square around the face box (the sidecar ``bbox`` grown by ``margin`` on each side)
or, without a box, the square that holds the whole image, centred. Parts of the square outside the
image are black. The square is resized to 224x224, so a model output ``(u, v)`` in [0, 1] maps
back to ``(x0 + u * side, y0 + v * side)`` in the oriented source image: that affine map is all
that travels with a sample (``crop = [x0, y0, side]``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from pipeline.model.geometry import INPUT_SIZE

DEFAULT_MARGIN = 0.25
DEFAULT_MAX_PIXELS = 100_000_000


class SampleError(ValueError):
    """Bad input for one sample: becomes that row's ``error`` (and ``error_kind``, one of
    ``pipeline.io.rows.ERROR_KINDS``); the job goes on."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


# A sidecar box may reach past the image (the crop is padded black), up to this many times the
# image's width / height; so a crop, padding included, stays within a few times the image.
MAX_BBOX_SCALE = 2.0


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes to an RGB image with its EXIF orientation applied.

    Any mode (L, LA, P, RGBA, CMYK, I;16, ...) is converted to RGB; transparency is laid on
    black. Raises ``SampleError`` for empty, unreadable, truncated or oversized images.
    """
    with image_errors():
        image = open_image(data, max_pixels)
        image.load()
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``data`` lazily (header only) and refuse it when empty or above ``max_pixels``.
    Use inside ``image_errors()`` so decoder errors become ``SampleError``."""
    if not data:
        raise SampleError("empty image (0 bytes)", "empty")
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise SampleError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels}", "too_large")
    return image


@contextlib.contextmanager
def image_errors():
    """Turn what PIL raises on bad image data into ``SampleError`` (kinds too_large, decode)."""
    try:
        yield
    except SampleError:
        raise
    except Image.DecompressionBombError as exc:
        raise SampleError(f"image refused as a decompression bomb: {exc}", "too_large") from None
    except Exception as exc:
        raise SampleError(f"cannot decode image: {exc.__class__.__name__}: {exc}",
                          "decode") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the full range down to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        grey = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(float(array.max() - array.min()), 1e-12)
        grey = ((array - array.min()) / span * 255.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def crop_square(
    width: int, height: int, bbox: Sequence[float] | None, margin: float = DEFAULT_MARGIN
) -> tuple[float, float, float]:
    """The square ``(x0, y0, side)`` the model sees, in source pixel coordinates."""
    if bbox is None:
        x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
    else:
        x0, y0, x1, y1 = (float(v) for v in bbox)
        grow_x, grow_y = (x1 - x0) * margin, (y1 - y0) * margin
        x0, y0, x1, y1 = x0 - grow_x, y0 - grow_y, x1 + grow_x, y1 + grow_y
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return cx - side / 2.0, cy - side / 2.0, side


def validate_bbox(bbox: object, width: int, height: int) -> list[float]:
    """Check a sidecar bbox ``[x0, y0, x1, y1]``; raises ``SampleError`` saying what is wrong."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise SampleError(f"bbox must be [x0, y0, x1, y1], got {bbox!r}", "bad_bbox")
    try:
        x0, y0, x1, y1 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise SampleError(f"bbox must hold 4 numbers, got {bbox!r}", "bad_bbox") from None
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise SampleError(f"bbox must hold finite numbers, got {bbox!r}", "bad_bbox")
    if x1 <= x0 or y1 <= y0:
        raise SampleError(f"bbox {bbox!r} is empty or inverted (need x0 < x1 and y0 < y1)",
                          "bad_bbox")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise SampleError(f"bbox {bbox!r} lies outside the {width}x{height} image", "bad_bbox")
    if x1 - x0 > MAX_BBOX_SCALE * width or y1 - y0 > MAX_BBOX_SCALE * height:
        # The crop (and its black padding) would dwarf the image: a box of 1e8 pixels on a
        # 300x260 photo once took 20 GB. Refused, not clipped: such a box is not a face's.
        raise SampleError(f"bbox {bbox!r} is more than {MAX_BBOX_SCALE:g}x the {width}x{height} "
                          "image", "bad_bbox")
    return [x0, y0, x1, y1]


def crop_and_resize(
    image: Image.Image, crop: tuple[float, float, float], size: int = INPUT_SIZE
) -> np.ndarray:
    """Cut the square ``crop`` out of ``image`` (black outside) and resize it to ``size``.

    Returns ``uint8`` HWC. One affine resample does both, so sub-pixel crops stay exact.
    """
    x0, y0, side = crop
    scale = side / size
    factor = int(scale)
    if factor >= 2:
        # Bilinear resampling aliases when shrinking more than 2x: box-filter down by an integer
        # factor first. reduce() maps output pixel i to input [i*f, (i+1)*f), so the crop simply
        # scales by 1/f.
        width, height = image.size
        if width % factor or height % factor:
            # reduce() would average a last, partial box as if it were full and move the image
            # edge outward; padding with black keeps each output pixel an area average.
            padded = Image.new(image.mode, (width + -width % factor, height + -height % factor))
            padded.paste(image)
            image = padded
        image = image.reduce(factor)
        x0, y0, scale = x0 / factor, y0 / factor, scale / factor
    # PIL's affine maps output pixel centres (i + 0.5) through (a, b, c, d, e, f) to input
    # coordinates, which is exactly x = x0 + u * side for u = (i + 0.5) / size.
    resized = image.transform(
        (size, size),
        Image.Transform.AFFINE,
        (scale, 0.0, x0, 0.0, scale, y0),
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )
    return np.asarray(resized, dtype=np.uint8)


def preprocess(
    data: bytes,
    bbox: Sequence[float] | None = None,
    margin: float = DEFAULT_MARGIN,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, int, int, tuple[float, float, float]]:
    """Bytes -> (224x224x3 uint8 pixels, width, height, crop) for one sample."""
    image = decode_image(data, max_pixels)
    width, height = image.size
    if bbox is not None:
        bbox = validate_bbox(bbox, width, height)
    crop = crop_square(width, height, bbox, margin)
    return crop_and_resize(image, crop), width, height, crop


def to_pixels(outputs: np.ndarray, crops: np.ndarray) -> np.ndarray:
    """Model outputs (N, 136) in [0, 1] of the crop -> (N, 68, 2) source pixel coordinates."""
    uv = outputs.reshape(len(outputs), -1, 2).astype(np.float64)
    crops = np.asarray(crops, dtype=np.float64).reshape(-1, 3)
    origin = crops[:, None, :2]
    side = crops[:, None, 2:3]
    return (origin + uv * side).astype(np.float32)
