"""Unit tests for pipeline.stages.preprocess: crop geometry, decoding, validation, normalisation."""

import io

import numpy as np
import pytest
from PIL import Image
from support.helpers import normalize

from pipeline.stages.preprocess import (
    SampleError,
    crop_and_resize,
    crop_square,
    decode_image,
    preprocess,
    to_pixels,
    validate_bbox,
)

SIZE = 224


def _png(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# crop_square / to_pixels
# --------------------------------------------------------------------------------------------


def test_crop_square_without_bbox_is_centred_square_holding_the_image():
    # 200x100 image: box [0, 0, 200, 100], side = max(200, 100) = 200, centre (100, 50)
    # -> x0 = 100 - 100 = 0, y0 = 50 - 100 = -50.
    assert crop_square(200, 100, None) == (0.0, -50.0, 200.0)
    # Portrait 100x300: side 300, centre (50, 150) -> (50 - 150, 150 - 150) = (-100, 0).
    assert crop_square(100, 300, None) == (-100.0, 0.0, 300.0)


def test_crop_square_with_bbox_and_margin():
    # bbox [10, 20, 50, 100]: width 40, height 80; margin 0.25 grows x by 10 and y by 20 on each
    # side -> [0, 0, 60, 120]. side = max(60, 120) = 120, centre (30, 60)
    # -> x0 = 30 - 60 = -30, y0 = 60 - 60 = 0.
    assert crop_square(640, 480, [10, 20, 50, 100], margin=0.25) == (-30.0, 0.0, 120.0)
    # margin 0: [10, 20, 50, 100] -> side 80, centre (30, 60) -> (30 - 40, 60 - 40) = (-10, 20).
    assert crop_square(640, 480, [10, 20, 50, 100], margin=0.0) == (-10.0, 20.0, 80.0)
    # Wide box, margin 0.5: [100, 50, 300, 150] w 200 h 100 -> grows 100 / 50 -> [0, 0, 400, 200]
    # side 400, centre (200, 100) -> (0, -100).
    assert crop_square(640, 480, [100, 50, 300, 150], margin=0.5) == (0.0, -100.0, 400.0)


def test_to_pixels_centre_of_crop():
    outputs = np.full((1, 136), 0.5, dtype=np.float32)
    pts = to_pixels(outputs, np.array([[10.0, 20.0, 100.0]]))
    assert pts.shape == (1, 68, 2) and pts.dtype == np.float32
    np.testing.assert_array_equal(pts[0], np.tile([60.0, 70.0], (68, 1)))


def test_to_pixels_hand_example_two_points_two_samples():
    outputs = np.zeros((2, 136), dtype=np.float32)
    # sample 0, crop (-30, 0, 120): point 0 (0, 1) -> (-30, 120); point 1 (0.25, 0.75) -> (0, 90)
    outputs[0, :4] = [0.0, 1.0, 0.25, 0.75]
    # sample 1, crop (5, -10, 40): point 0 (0.5, 0.125) -> (25, -5); point 1 (1, 0) -> (45, -10)
    outputs[1, :4] = [0.5, 0.125, 1.0, 0.0]
    crops = np.array([[-30.0, 0.0, 120.0], [5.0, -10.0, 40.0]])
    pts = to_pixels(outputs, crops)
    np.testing.assert_array_equal(pts[0, :2], [[-30.0, 120.0], [0.0, 90.0]])
    np.testing.assert_array_equal(pts[1, :2], [[25.0, -5.0], [45.0, -10.0]])
    # The remaining points are (0, 0) of each crop: the crop origin.
    np.testing.assert_array_equal(pts[0, 2:], np.tile([-30.0, 0.0], (66, 1)))
    np.testing.assert_array_equal(pts[1, 2:], np.tile([5.0, -10.0], (66, 1)))


# --------------------------------------------------------------------------------------------
# crop_and_resize: exact geometry
# --------------------------------------------------------------------------------------------


def _blob_image(width: int, height: int, cx: float, cy: float, sigma: float) -> Image.Image:
    """A Gaussian blob centred at continuous (cx, cy); pixel (i, j) has its centre at i + 0.5."""
    x = np.arange(width) + 0.5
    y = np.arange(height) + 0.5
    g = np.exp(-((x[None, :] - cx) ** 2 + (y[:, None] - cy) ** 2) / (2 * sigma**2))
    a = np.round(255 * g).astype(np.uint8)
    return Image.fromarray(np.stack([a, a, a], axis=-1), "RGB")


def _centroid_in_source(out: np.ndarray, crop) -> tuple[float, float]:
    a = out[..., 0].astype(np.float64)
    ys, xs = np.indices(a.shape)
    total = a.sum()
    cu, cv = (a * xs).sum() / total, (a * ys).sum() / total
    x0, y0, side = crop
    # Output pixel index c has its centre at c + 0.5, i.e. u = (c + 0.5) / 224 of the crop.
    return x0 + (cu + 0.5) / SIZE * side, y0 + (cv + 0.5) / SIZE * side


@pytest.mark.parametrize(
    "cx, cy, sigma, crop",
    [
        (83.37, 61.81, 3.0, (40.2, 20.7, 120.3)),  # upscale, sub-pixel crop inside the image
        (83.37, 61.81, 3.0, (-50.5, -80.25, 300.0)),  # downscale < 2x, crop beyond every edge
        (150.6, 30.3, 4.0, (100.0, -40.0, 96.7)),  # crop above the image top
        (12.6, 140.3, 2.0, (-30.0, 90.0, 80.0)),  # crop beyond the left and bottom edges
        (100.25, 75.75, 3.0, (0.0, -25.0, 200.0)),  # the no-bbox square of a 200x150 image
    ],
)
def test_crop_and_resize_maps_positions_exactly(cx, cy, sigma, crop):
    img = _blob_image(200, 150, cx, cy, sigma)
    out = crop_and_resize(img, crop)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    x, y = _centroid_in_source(out, crop)
    # Tolerance: 0.05 source pixels (a half-pixel convention error would be >= 0.17 px here).
    assert abs(x - cx) < 0.05 and abs(y - cy) < 0.05, (x - cx, y - cy)


@pytest.mark.parametrize(
    "size, cx, cy, sigma, crop",
    [
        ((1200, 900), 613.4, 377.9, 25.0, (-100.3, -50.7, 1100.0)),  # scale 4.9 -> reduce(4)
        ((1200, 900), 613.4, 377.9, 25.0, (200.3, 100.7, 700.0)),  # scale 3.1 -> reduce(3)
        ((3000, 2000), 1613.4, 977.9, 50.0, (-200.3, -250.7, 2500.0)),  # scale 11.2 -> reduce(11)
    ],
)
def test_crop_and_resize_large_downscale_goes_through_reduce(size, cx, cy, sigma, crop):
    img = _blob_image(*size, cx, cy, sigma)
    out = crop_and_resize(img, crop)
    scale = crop[2] / SIZE
    assert scale > 2  # the reduce() branch
    x, y = _centroid_in_source(out, crop)
    # Tolerance: 0.1 output pixel, i.e. 0.1 * scale source pixels.
    tol = 0.1 * scale
    assert abs(x - cx) < tol and abs(y - cy) < tol, (x - cx, y - cy, tol)


@pytest.mark.parametrize(
    "size, crop",
    [
        ((100, 80), (-50.3, -60.7, 200.0)),  # scale < 1: plain bilinear
        ((300, 200), (-150.5, 20.25, 400.0)),  # scale 1.8: plain bilinear
        ((1000, 800), (-500.0, -600.0, 2000.0)),  # scale 8.9: reduce(8), sizes divisible by 8
    ],
)
def test_crop_and_resize_outside_the_image_is_black(size, crop):
    width, height = size
    img = Image.new("RGB", size, (255, 255, 255))
    out = crop_and_resize(img, crop)
    x0, y0, side = crop
    centres = (np.arange(SIZE) + 0.5) / SIZE * side
    xs, ys = x0 + centres, y0 + centres
    inside = ((xs >= 0) & (xs < width))[None, :] & ((ys >= 0) & (ys < height))[:, None]
    # Stay clear of pixels whose centre falls (numerically) on an image edge.
    near = lambda v, edges: np.min([np.abs(v - e) for e in edges], axis=0) < 1e-6  # noqa: E731
    clear = ~(near(xs, (0, width))[None, :] | near(ys, (0, height))[:, None])
    assert inside.any() and (~inside).any()
    for c in range(3):
        np.testing.assert_array_equal(out[..., c][clear & ~inside], 0)
        np.testing.assert_array_equal(out[..., c][clear & inside], 255)


def test_preprocess_returns_size_and_crop():
    img = Image.new("RGB", (200, 100), (10, 200, 30))
    pixels, width, height, crop = preprocess(_png(img), bbox=[10, 20, 50, 100], margin=0.25)
    assert (width, height) == (200, 100)
    assert crop == (-30.0, 0.0, 120.0)
    assert pixels.shape == (SIZE, SIZE, 3)
    # The crop spans x in [-30, 90), y in [0, 120): x < 0 (columns < 56) and y >= 100 (rows
    # > 186) are outside the image and black; the rest is the image colour.
    np.testing.assert_array_equal(pixels[:, :50], 0)
    np.testing.assert_array_equal(pixels[190:], 0)
    np.testing.assert_array_equal(pixels[:180, 60:], np.broadcast_to([10, 200, 30], (180, 164, 3)))


# --------------------------------------------------------------------------------------------
# decode_image
# --------------------------------------------------------------------------------------------


def _red_left_half_jpeg(orientation: int | None) -> bytes:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = img.getexif()
    if orientation is not None:
        exif[0x0112] = orientation
    return _jpeg(img, exif=exif, quality=95)


def _is_red(px) -> bool:
    return px[0] > 200 and px[1] < 50 and px[2] < 50


def _is_blue(px) -> bool:
    return px[0] < 50 and px[1] < 50 and px[2] > 200


def test_decode_applies_exif_orientation_6():
    # Orientation 6: rotate 90 degrees clockwise to display -> the left half goes to the top.
    a = np.asarray(decode_image(_red_left_half_jpeg(6)))
    assert a.shape == (40, 20, 3)  # 20 wide, 40 high
    assert _is_red(a[5, 10]) and _is_red(a[15, 3])
    assert _is_blue(a[25, 10]) and _is_blue(a[35, 16])


def test_decode_applies_exif_orientation_8():
    # Orientation 8: rotate 90 degrees counter-clockwise -> the left half goes to the bottom.
    image = decode_image(_red_left_half_jpeg(8))
    assert image.mode == "RGB" and image.size == (20, 40)
    a = np.asarray(image)
    assert _is_blue(a[5, 10]) and _is_blue(a[15, 3])
    assert _is_red(a[25, 10]) and _is_red(a[35, 16])


def test_decode_without_orientation_keeps_layout():
    image = decode_image(_red_left_half_jpeg(None))
    assert image.size == (40, 20)
    a = np.asarray(image)
    assert _is_red(a[10, 5]) and _is_blue(a[10, 35])


def _decoded(data: bytes) -> np.ndarray:
    image = decode_image(data)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_decode_mode_L():
    a = _decoded(_png(Image.new("L", (8, 6), 100)))
    assert a.shape == (6, 8, 3)
    np.testing.assert_array_equal(a, 100)


def test_decode_mode_LA_lays_transparency_on_black():
    img = Image.new("LA", (8, 6), (200, 255))
    img.paste((50, 0), (0, 0, 4, 6))  # left half fully transparent
    a = _decoded(_png(img))
    np.testing.assert_array_equal(a[:, :4], 0)
    np.testing.assert_array_equal(a[:, 4:], 200)


def test_decode_mode_P_with_transparency():
    img = Image.new("P", (8, 6), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    img.paste(1, (0, 0, 8, 3))  # top half index 1 (green), declared transparent
    assert img.mode == "P"
    a = _decoded(_png(img, transparency=1))
    np.testing.assert_array_equal(a[:3], 0)
    np.testing.assert_array_equal(a[3:], np.broadcast_to([255, 0, 0], (3, 8, 3)))


def test_decode_mode_P_without_transparency():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    a = _decoded(_png(img))
    np.testing.assert_array_equal(a, np.broadcast_to([0, 255, 0], (4, 4, 3)))


def test_decode_mode_RGBA():
    img = Image.new("RGBA", (8, 6), (10, 20, 30, 255))
    img.paste((255, 255, 255, 0), (0, 0, 8, 2))
    a = _decoded(_png(img))
    np.testing.assert_array_equal(a[:2], 0)
    np.testing.assert_array_equal(a[2:], np.broadcast_to([10, 20, 30], (4, 8, 3)))


@pytest.mark.parametrize(
    "cmyk, rgb",
    [((0, 255, 255, 0), (255, 0, 0)), ((0, 0, 0, 0), (255, 255, 255)), ((0, 0, 0, 255), (0, 0, 0))],
)
def test_decode_cmyk_jpeg(cmyk, rgb):
    data = _jpeg(Image.new("CMYK", (16, 16), cmyk), quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    a = _decoded(data).astype(int)
    assert np.abs(a - np.array(rgb)).max() <= 3


def test_decode_16_bit_png_scales_full_range():
    values = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    img = Image.fromarray(values)
    data = _png(img)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    a = _decoded(data)
    # v / 65535 * 255, rounded: 65535 -> 255, 32768 -> 127.5+ -> 128, 0 -> 0, 257 -> 1
    np.testing.assert_array_equal(a[0, :, 0], [255, 128, 0, 1])
    np.testing.assert_array_equal(a[..., 0], a[..., 1])
    np.testing.assert_array_equal(a[..., 0], a[..., 2])


def test_decode_16_bit_png_is_not_stretched_to_its_own_maximum():
    # A dark 16-bit image stays dark: the full 16-bit range maps to 8 bits.
    img = Image.fromarray(np.full((3, 3), 32768, dtype=np.uint16))
    np.testing.assert_array_equal(_decoded(_png(img)), 128)


def test_decode_rgb_jpeg_passes_through():
    a = _decoded(_jpeg(Image.new("RGB", (16, 8), (40, 120, 220)), quality=95)).astype(int)
    assert a.shape == (8, 16, 3)
    assert np.abs(a - [40, 120, 220]).max() <= 3


def test_decode_empty_bytes():
    with pytest.raises(SampleError, match="empty image"):
        decode_image(b"")


def test_decode_random_bytes():
    data = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    with pytest.raises(SampleError, match="cannot decode image"):
        decode_image(data)


def test_decode_truncated_jpeg():
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _jpeg(Image.fromarray(noise, "RGB"), quality=90)
    decode_image(data)  # the whole file is fine
    with pytest.raises(SampleError, match="cannot decode image.*truncated"):
        decode_image(data[: len(data) // 2])


def test_decode_pixel_limit():
    data = _png(Image.new("RGB", (100, 100)))
    assert decode_image(data, max_pixels=10_000).size == (100, 100)  # exactly at the limit
    with pytest.raises(SampleError, match=r"100x100 = 10000 pixels, above the limit of 9999"):
        decode_image(data, max_pixels=9_999)


def test_sample_error_is_a_value_error():
    assert issubclass(SampleError, ValueError)


# --------------------------------------------------------------------------------------------
# validate_bbox
# --------------------------------------------------------------------------------------------


def test_validate_bbox_good_returns_floats():
    out = validate_bbox([10, 20, 50, 100], 200, 150)
    assert out == [10.0, 20.0, 50.0, 100.0]
    assert all(type(v) is float for v in out)
    # Partly outside the image is allowed.
    assert validate_bbox((-5, -5, 10.5, 10.5), 200, 150) == [-5.0, -5.0, 10.5, 10.5]
    assert validate_bbox((-200, -150, 200, 150), 200, 150) == [-200.0, -150.0, 200.0, 150.0]


@pytest.mark.parametrize(
    "bbox, message",
    [
        ([50, 20, 10, 100], "empty or inverted"),  # x inverted
        ([10, 100, 50, 20], "empty or inverted"),  # y inverted
        ([10, 20, 10, 100], "empty or inverted"),  # zero width
        ([10, 20, 50, 20], "empty or inverted"),  # zero height
        (["a", 20, 50, 100], "4 numbers"),
        ([None, 20, 50, 100], "4 numbers"),
        ([10, 20, 50], r"\[x0, y0, x1, y1\]"),
        ([10, 20, 50, 100, 5], r"\[x0, y0, x1, y1\]"),
        ("10,20,50,100", r"\[x0, y0, x1, y1\]"),
        (None, r"\[x0, y0, x1, y1\]"),
        ([float("nan"), 20, 50, 100], "finite"),
        ([10, 20, float("inf"), 100], "finite"),
        ([200, 20, 250, 100], "outside the 200x150 image"),  # right of the image
        ([10, 150, 50, 200], "outside the 200x150 image"),  # below
        ([-50, 20, 0, 100], "outside the 200x150 image"),  # left
        ([10, -40, 50, -1], "outside the 200x150 image"),  # above
        ([0, 0, 1e8, 1e8], "more than 2x the 200x150 image"),  # once took 20 GB, then OOM
        ([-250, 0, 160, 100], "more than 2x the 200x150 image"),  # 410 wide
        ([0, -200, 50, 120], "more than 2x the 200x150 image"),  # 320 high
    ],
)
def test_validate_bbox_rejects(bbox, message):
    with pytest.raises(SampleError, match=message):
        validate_bbox(bbox, 200, 150)


def test_preprocess_validates_bbox():
    data = _png(Image.new("RGB", (20, 10)))
    with pytest.raises(SampleError, match="outside"):
        preprocess(data, bbox=[30, 0, 40, 5])


def test_absurd_bbox_is_refused_before_any_crop_is_built():
    """[0, 0, 1e8, 1e8] on a 300x260 photo: bad_bbox at once on both decode paths (the CPU
    path once padded the image to the crop's scale, 20 GB; the GPU path to terabytes)."""
    from pipeline.stages.gpu_decode import probe_and_crop

    data = _jpeg(Image.new("RGB", (300, 260), (90, 120, 150)))
    for run in (lambda: preprocess(data, bbox=[0, 0, 1e8, 1e8]),
                lambda: probe_and_crop(data, [0, 0, 1e8, 1e8])):
        with pytest.raises(SampleError, match="more than 2x the 300x260 image") as err:
            run()
        assert err.value.kind == "bad_bbox"
    pixels, *_ = preprocess(data, bbox=[-300, -260, 300, 260])  # 2x: allowed, padded black
    assert pixels.shape == (224, 224, 3) and pixels[:40].max() == 0 and pixels[150:].max() > 0


# --------------------------------------------------------------------------------------------
# normalize
# --------------------------------------------------------------------------------------------


def test_normalize_matches_manual_imagenet_normalisation():
    pixels = np.random.default_rng(2).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    out = normalize(pixels)
    assert out.shape == (2, 3, 5, 4) and out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for n in range(2):
        for c in range(3):
            expected = (pixels[n, :, :, c] / 255.0 - mean[c]) / std[c]
            np.testing.assert_allclose(out[n, c], expected, rtol=1e-5, atol=1e-6)
    # Spot values: 0 -> -mean/std, 255 -> (1 - mean)/std.
    edge = normalize(np.array([[[[0, 255, 0]]]], dtype=np.uint8))[0, :, 0, 0]
    np.testing.assert_allclose(edge, [-0.485 / 0.229, 0.544 / 0.224, -0.406 / 0.225], rtol=1e-6)


def test_reduce_path_keeps_the_image_edge_when_size_is_not_a_multiple_of_the_factor():
    # 1001 px wide, factor 8: without padding the last partial box counted as full image.
    white = Image.new("RGB", (1001, 1001), (255, 255, 255))
    out = crop_and_resize(white, (-500.0, -500.0, 2002.0))  # scale 8.94 -> factor 8
    side = 2002.0 / 224
    centres = -500.0 + (np.arange(224) + 0.5) * side
    # The first output pixel past the edge (centre at x = 1005.97) sees 1 real column of its
    # 8-pixel box: about 1/8 white after padding, fully white (255) without it.
    beyond = centres > 1003
    assert beyond.any() and (out[112, beyond] < 64).all()
    assert (out[112, centres > 1001 + side] == 0).all()
    inside = (centres > side) & (centres < 1001 - side)
    assert (out[112, inside] == 255).all()
