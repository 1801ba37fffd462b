"""pipeline.stages.gpu_decode against the CPU path (preprocess.preprocess): header probe, device
decode + orientation + crop + resize, fallbacks, and the stated tolerance in both directions.

The comparisons run with device="cpu" (torchvision's libjpeg-turbo decoder, so the pixels must
equal the CPU path's) and, where CUDA is present, with device="cuda" (nvJPEG, within TOLERANCE).
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from support.helpers import (
    DATA,
    LANDMARK_TOLERANCE_PX,
    SAME_DECODER_TOLERANCE,
    TOLERANCE,
    bad_table,
    normalize,
    real_photo,
)

from pipeline.demo.synthetic import render_face
from pipeline.stages.gpu_decode import (
    decode_crop_resize,
    device_decode_problem,
    probe,
    probe_and_crop,
)
from pipeline.stages.preprocess import (
    SampleError,
    crop_and_resize,
    decode_image,
    preprocess,
    to_pixels,
)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# PIL's ImageOps.exif_transpose, spelled out for images that carry no EXIF.
PIL_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.fixture(autouse=True)
def one_thread(request):
    """The resampling is many small tensor ops: on a busy 2-core machine one thread each is
    several times faster than two fighting for the cores. The model keeps its threads."""
    if "landmarks" in request.node.name:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jpeg(image: Image.Image, orientation: int = 1, **save) -> bytes:
    save.setdefault("quality", 90)
    if image.mode == "RGB":
        save.setdefault("subsampling", 2)  # 4:2:0
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif
    buf = io.BytesIO()
    image.save(buf, "JPEG", **save)
    return buf.getvalue()


@functools.cache
def face(size: tuple[int, int]) -> tuple[Image.Image, list[float]]:
    image, _, bbox = render_face(np.random.default_rng(list(size)), size)
    return image, bbox


def boxes(size: tuple[int, int], orientation: int) -> dict[str, list[float] | None]:
    """In pixels of the oriented image: the face's box, one across the top-left corner, none."""
    image, bbox = face(size)
    if orientation in PIL_TRANSPOSE:  # carry the box along with the pixels
        mask = Image.new("L", image.size)
        ImageDraw.Draw(mask).rectangle([round(v) for v in bbox], fill=255)
        mask = mask.transpose(PIL_TRANSPOSE[orientation])
        bbox = [float(v) for v in mask.getbbox()]
        image = image.transpose(PIL_TRANSPOSE[orientation])
    width, height = image.size
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    corner = [-0.4 * w, -0.3 * h, min(0.6 * w, width - 1), min(0.7 * h, height - 1)]
    return {"in": bbox, "corner": corner, "none": None}


def synthetic_cases() -> list[tuple[str, bytes, list[float] | None]]:
    """(name, bytes, bbox): sizes from 50x40 (upscaled) to 1917x1077, every EXIF orientation,
    boxes inside / across the border / none, grey, progressive, 4:4:4, 4:2:2, MPO."""
    cases = []
    plan = {
        (640, 480): range(1, 9),  # every orientation with every kind of box
        (641, 479): (2, 4, 5, 8),  # odd sizes: the box average pads the (mirrored) far edge
        (250, 250): (1, 5, 7),
        (50, 40): range(1, 9),
        (1917, 1077): (1, 7),
    }
    for size, orientations in plan.items():
        image, bbox = face(size)
        for orientation in orientations:
            for kind, box in boxes(size, orientation).items():
                if size == (50, 40) and kind != "in" and orientation not in (1, 6):
                    continue
                cases.append((f"{size} o{orientation} {kind}", jpeg(image, orientation), box))
    image, bbox = face((640, 480))
    cases += [
        ("grey", jpeg(image.convert("L")), bbox),
        ("grey o8", jpeg(image.convert("L"), 8), None),
        ("progressive", jpeg(image, progressive=True), bbox),
        ("progressive o3", jpeg(image, 3, progressive=True), boxes((640, 480), 3)["corner"]),
        ("4:4:4", jpeg(image, subsampling=0), bbox),
        ("4:2:2 o6", jpeg(face((250, 250))[0], 6, subsampling=1), None),
    ]
    buf = io.BytesIO()
    image.save(buf, "MPO", save_all=True, append_images=[image.rotate(90)], quality=90)
    cases.append(("MPO", buf.getvalue(), bbox))
    return cases


def photo_cases():
    data, sidecar = real_photo("breakingbad.jpg")
    return [("breakingbad box", data, sidecar["bbox"]), ("breakingbad none", data, None)]


def on_device(cases, device, shift=(0.0, 0.0), orientation=None):
    """The device path for ``cases``, all in one batch: (pixels as numpy, failed, refs, crops).

    ``shift`` moves every crop by that many output pixels; ``orientation`` overrides the probed
    one: both only to show that such errors exceed the tolerance.
    """
    refs, crops, orientations, encoded, sizes = [], [], [], [], []
    for name, data, bbox in cases:
        info, crop = probe_and_crop(data, bbox)
        reference, width, height, ref_crop = preprocess(data, bbox)
        assert crop == ref_crop and (info.oriented_width, info.oriented_height) == (width, height)
        assert info.device_decodable, (name, info.reason)
        refs.append(reference)
        x0, y0, side = crop
        crops.append((x0 + shift[0] * side / 224, y0 + shift[1] * side / 224, side))
        orientations.append(orientation or info.orientation)
        encoded.append(data)
        sizes.append((info.width, info.height))
    pixels, failed = decode_crop_resize(encoded, orientations, np.array(crops), device,
                                        stored_sizes=np.array(sizes))
    assert pixels.shape == (len(cases), 224, 224, 3) and pixels.dtype == torch.uint8
    assert pixels.device.type == torch.device(device).type
    return pixels.cpu().numpy(), failed, refs, crops


def differences(pixels, refs, tolerance):
    return [tolerance.check(p, r) for p, r in zip(pixels, refs, strict=True)]


# --------------------------------------------------------------------------------------------
# probe
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_probe_reads_size_and_orientation_from_the_header(orientation):
    image, _ = face((640, 480))
    data = jpeg(image, orientation)
    info = probe(data)
    assert (info.format, info.width, info.height) == ("JPEG", 640, 480)
    assert info.orientation == orientation and info.device_decodable and info.reason == ""
    decoded = decode_image(data)  # the CPU path's oriented image
    assert (info.oriented_width, info.oriented_height) == decoded.size


def test_probe_and_crop_give_the_cpu_paths_size_crop_and_errors():
    image, bbox = face((640, 480))
    data = jpeg(image, 6)
    for box in (None, [10, 20, 200, 300], [-50, -40, 100, 120]):
        info, crop = probe_and_crop(data, box, margin=0.3)
        _, width, height, expected = preprocess(data, box, margin=0.3)
        assert crop == expected and (info.oriented_width, info.oriented_height) == (width, height)
    # Errors: same kinds and messages as preprocess (garbage: same kind, the message names
    # the BytesIO object, which differs per call).
    for data, box, kind in (
        (b"", None, "empty"),
        (b"not an image at all", None, "decode"),
        (jpeg(image), [700, 10, 800, 50], "bad_bbox"),  # outside the 640x480 image
        (jpeg(image, 6), [500, 10, 600, 50], "bad_bbox"),  # inside 640x480, not 480x640
        (jpeg(image), [50, 50, 40, 60], "bad_bbox"),  # inverted
    ):
        with pytest.raises(SampleError) as ours:
            probe_and_crop(data, box)
        with pytest.raises(SampleError) as cpu:
            preprocess(data, box)
        assert ours.value.kind == cpu.value.kind == kind
        if kind != "decode":
            assert str(ours.value) == str(cpu.value)
        else:
            assert str(ours.value).startswith("cannot decode image: UnidentifiedImageError")
    with pytest.raises(SampleError) as ours:
        probe(jpeg(image), max_pixels=1000)
    with pytest.raises(SampleError) as cpu:
        decode_image(jpeg(image), max_pixels=1000)
    assert ours.value.kind == cpu.value.kind == "too_large"
    assert str(ours.value) == str(cpu.value)


def test_probe_sends_what_nvjpeg_cannot_take_to_the_cpu():
    image, _ = face((250, 250))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    png = buf.getvalue()
    cmyk = jpeg(image.convert("CMYK"))
    whole = jpeg(image)
    cut = whole[: len(whole) // 2]
    ppm = (DATA / "takeo.ppm").read_bytes()
    for data, fmt, reason in (
        (png, "PNG", "PNG is not JPEG"),
        (ppm, "PPM", "PPM is not JPEG"),
        (cmyk, "JPEG", "CMYK JPEG"),
        (cut, "JPEG", "truncated JPEG (no end-of-image marker)"),
    ):
        info = probe(data)
        assert (info.format, info.device_decodable, info.reason) == (fmt, False, reason)
    # ... and the CPU path takes all but the cut JPEG, which it reports as a decode error.
    for data in (png, ppm, cmyk):
        preprocess(data)
    with pytest.raises(SampleError) as exc:
        preprocess(cut)
    assert exc.value.kind == "decode"
    assert device_decode_problem(whole) == ""
    assert device_decode_problem(b"\xff\xd8\xff") != ""


# --------------------------------------------------------------------------------------------
# decode_crop_resize on the CPU: the same decoder, so the CPU path's pixels
# --------------------------------------------------------------------------------------------


def test_device_path_gives_the_cpu_paths_pixels():
    cases = synthetic_cases() + photo_cases()
    pixels, failed, refs, _ = on_device(cases, "cpu")
    assert failed == {}
    for (name, _, _), (mean, p99, within) in zip(
            cases, differences(pixels, refs, SAME_DECODER_TOLERANCE), strict=True):
        assert within, (name, mean, p99)  # measured: identical on every case


def test_geometry_errors_exceed_the_tolerance():
    """Geometry errors are caught. The same-decoder tolerance sees a crop moved by half an
    output pixel, or a wrong orientation, on every image; the cross-decoder TOLERANCE, which
    must also admit nvJPEG's noise, sees a wrong orientation on face and whole-image crops and
    a crop moved by two output pixels along both axes on face crops that are not magnified."""
    cases = [c for c in synthetic_cases() if not c[0].startswith("(1917, 1077)")]
    cases = [c for c in cases if not c[0].startswith("(50, 40)") or " o1 " in c[0]]
    cases += photo_cases()

    pixels, _, refs, _ = on_device(cases, "cpu", shift=(0.5, -0.5))
    for (name, _, _), (mean, p99, within) in zip(
            cases, differences(pixels, refs, SAME_DECODER_TOLERANCE), strict=True):
        assert not within, (name, mean, p99)

    pixels, _, refs, crops = on_device(cases, "cpu", shift=(2.0, 2.0))
    faces = [i for i, (name, _, _) in enumerate(cases)
             if name.endswith((" in", " box")) and crops[i][2] >= 224]
    assert len(faces) >= 10
    for i in faces:
        assert not TOLERANCE.check(pixels[i], refs[i])[2], cases[i][0]

    oriented = [c for c in cases if " o" in c[0] and " o1 " not in c[0]]
    pixels, _, refs, _ = on_device(oriented, "cpu", orientation=1)  # EXIF ignored
    for (name, _, _), pixel, ref in zip(oriented, pixels, refs, strict=True):
        assert not SAME_DECODER_TOLERANCE.check(pixel, ref)[2], name
        if not name.endswith("corner"):  # a corner crop may hold little but background
            assert not TOLERANCE.check(pixel, ref)[2], name


def test_failures_are_reported_for_the_cpu_fallback_not_raised():
    image, bbox = face((250, 250))
    good = jpeg(image, 6)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    encoded = [
        good,
        buf.getvalue(),                               # PNG
        jpeg(image.convert("CMYK")),                  # CMYK
        np.random.default_rng(0).bytes(5000),         # noise
        b"",                                          # nothing
        bad_table(jpeg(image)),                       # the decoder refuses its Huffman table
        good[: len(good) // 2],                       # cut short
        np.frombuffer(good, dtype=np.uint8),          # good, as a uint8 array
        good,                                         # good, but not the size probed
    ]
    info, crop = probe_and_crop(good, bbox)
    sizes = np.array([(info.width, info.height)] * len(encoded))
    sizes[-1] = (info.width + 1, info.height)
    pixels, failed = decode_crop_resize(encoded, [6] * len(encoded), np.array([crop] * 9),
                                        stored_sizes=sizes)
    assert failed == {1: "format", 2: "format", 3: "format", 4: "format",
                      5: "decoder_error", 6: "format", 8: "size_mismatch"}
    reference = preprocess(good, bbox)[0]
    np.testing.assert_array_equal(pixels[0].numpy(), reference)
    np.testing.assert_array_equal(pixels[7].numpy(), reference)
    assert not pixels[list(failed)].any()
    empty, none_failed = decode_crop_resize([], [], np.zeros((0, 3)))
    assert empty.shape == (0, 224, 224, 3) and none_failed == {}
    with pytest.raises(ValueError, match="orientation"):
        decode_crop_resize([good], [9], np.array([crop]))
    with pytest.raises(ValueError, match="side > 0"):
        decode_crop_resize([good], [1], np.array([[0.0, 0.0, 0.0]]))


def test_a_crop_that_misses_the_image_is_black():
    image, _ = face((250, 250))
    pixels, failed = decode_crop_resize([jpeg(image)], [1], np.array([[300.0, 0.0, 100.0]]))
    assert failed == {} and not pixels.any()
    assert not crop_and_resize(image, (300.0, 0.0, 100.0)).any()


# --------------------------------------------------------------------------------------------
# Landmarks
# --------------------------------------------------------------------------------------------


def nvjpeg_like(data: bytes, rng: np.random.Generator) -> Image.Image:
    """The CPU path's oriented image as a decoder like nvJPEG would give it: chroma upsampled
    by repetition instead of libjpeg's interpolation, and +-1 level of IDCT noise. How
    TOLERANCE was sized where no GPU was at hand."""
    source = Image.open(io.BytesIO(data))
    orientation = source.getexif().get(0x0112, 1)
    source.draft("YCbCr", source.size)
    ycc = np.asarray(source, dtype=np.float64).copy()
    height, width = ycc.shape[:2]
    for c in (1, 2):  # 4:2:0: back to one chroma sample per 2x2, then repeat it
        plane = np.pad(ycc[:, :, c], ((0, height % 2), (0, width % 2)), mode="edge")
        coarse = plane.reshape(plane.shape[0] // 2, 2, plane.shape[1] // 2, 2).mean((1, 3))
        ycc[:, :, c] = coarse.repeat(2, 0).repeat(2, 1)[:height, :width]
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
    rgb += rng.integers(-1, 2, rgb.shape)
    image = Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")
    return image.transpose(PIL_TRANSPOSE[orientation]) if orientation in PIL_TRANSPOSE else image


def landmarks(model, pixels: np.ndarray, crops) -> np.ndarray:
    """fp32 CPU forward with the predictor's normalisation -> source pixel coordinates.
    ``model``: conftest's ``weights_file`` model, ``load_model(init="random", seed=7)``."""
    with torch.inference_mode():
        outputs = model(torch.from_numpy(normalize(pixels))).numpy()
    return to_pixels(outputs, np.asarray(crops))


def test_landmarks_from_both_paths_agree(weights_file):
    image, bbox = face((640, 480))
    cases = [("640x480 o6", jpeg(image, 6), boxes((640, 480), 6)["in"])] + photo_cases()[:1]
    pixels, failed, refs, crops = on_device(cases, "cpu")
    assert failed == {}
    # The same decoder: the same pixels, so the model gives the same landmarks.
    np.testing.assert_array_equal(pixels, np.stack(refs))
    # A decoder like nvJPEG: its pixels stay within TOLERANCE, its landmarks within
    # LANDMARK_TOLERANCE_PX (measured: <= 0.09 px on these images with the random model).
    rng = np.random.default_rng(3)
    noisy = np.stack([crop_and_resize(nvjpeg_like(data, rng), crop)
                      for (_, data, _), crop in zip(cases, crops, strict=True)])
    for n, r in zip(noisy, refs, strict=True):
        assert TOLERANCE.check(n, r)[2]
    points = landmarks(weights_file[1], np.concatenate([np.stack(refs), noisy]), crops * 2)
    ref, emulated = np.split(points, 2)
    assert np.abs(emulated - ref).max() <= LANDMARK_TOLERANCE_PX


# --------------------------------------------------------------------------------------------
# CUDA: nvJPEG (skipped without a GPU)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_cuda_geometry_is_exact_on_the_device_decoded_image():
    """Decoder aside, the device path is the CPU path: crop_and_resize of nvJPEG's own image,
    oriented by PIL, gives the same pixels."""
    from torchvision.io import ImageReadMode, decode_jpeg

    cases = synthetic_cases() + photo_cases()
    pixels, failed, _, crops = on_device(cases, "cuda")
    assert failed == {}
    for i, (name, data, _) in enumerate(cases):
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        decoded = decode_jpeg(tensor, mode=ImageReadMode.RGB, device="cuda")
        image = Image.fromarray(decoded.permute(1, 2, 0).cpu().numpy())
        orientation = probe(data).orientation
        if orientation in PIL_TRANSPOSE:
            image = image.transpose(PIL_TRANSPOSE[orientation])
        mean, p99, within = SAME_DECODER_TOLERANCE.check(pixels[i], crop_and_resize(image,
                                                                                   crops[i]))
        assert within, (name, mean, p99)


@pytest.mark.gpu
@needs_cuda
def test_cuda_pixels_and_landmarks_match_the_cpu_path(weights_file):
    cases = synthetic_cases() + photo_cases()
    pixels, failed, refs, crops = on_device(cases, "cuda")
    assert failed == {}
    found = differences(pixels, refs, TOLERANCE)
    worst = (max(m for m, _, _ in found), max(p for _, p, _ in found))
    outside = [(c[0], m, p) for c, (m, p, ok) in zip(cases, found, strict=True) if not ok]
    assert not outside, f"worst mean/p99 {worst}; outside TOLERANCE: {outside}"
    picked = [i for i, c in enumerate(cases) if c[0] in ("(640, 480) o6 in", "breakingbad box")]
    points = landmarks(weights_file[1], np.concatenate([np.stack(refs)[picked], pixels[picked]]),
                       [crops[i] for i in picked] * 2)
    ref, device = np.split(points, 2)
    assert np.abs(device - ref).max() <= LANDMARK_TOLERANCE_PX


@pytest.mark.gpu
@needs_cuda
def test_cuda_failures_are_reported_and_the_rest_decoded():
    image, bbox = face((250, 250))
    good = jpeg(image, 3)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    encoded = [good, bad_table(jpeg(image)), buf.getvalue(), jpeg(image.convert("CMYK")), good]
    info, crop = probe_and_crop(good, bbox)
    pixels, failed = decode_crop_resize(encoded, [3] * 5, np.array([crop] * 5), "cuda")
    assert failed == {1: "decoder_error", 2: "format", 3: "format"}
    reference = preprocess(good, bbox)[0]
    for i in (0, 4):
        assert TOLERANCE.check(pixels[i].cpu().numpy(), reference)[2]
    assert not pixels[list(failed)].any()
