"""Augmentations keep labels exact: the flip permutation, flipped faces, warped dot images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from support.helpers import flip_landmarks, identity_params

from pipeline.demo.synthetic import render_face
from pipeline.io.shards import Sample
from pipeline.stages.labels import LabelledReader
from pipeline.training.augment import FLIP_PERMUTATION, augment_batch, gaussian_blur, sample_params
from pipeline.training.config import AugmentConfig

CONTEXT = 1.5


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _batch(sample: Sample, context: float = CONTEXT):
    """One sample through the training reader, as the tensors a worker receives."""
    _, pixels, uv, pixel_uv, _ = LabelledReader(context=context).prepare(sample)
    return (
        torch.from_numpy(pixels.copy())[None],
        torch.from_numpy(uv)[None],
        torch.tensor([pixel_uv]),
    )


def test_flip_permutation_is_an_involution_with_the_ibug_pairs():
    perm = np.asarray(FLIP_PERMUTATION)
    assert sorted(perm.tolist()) == list(range(68))
    assert (perm[perm] == np.arange(68)).all()
    pairs = [
        (0, 16),
        (3, 13),
        (17, 26),
        (21, 22),
        (31, 35),
        (32, 34),
        (36, 45),
        (37, 44),
        (38, 43),
        (39, 42),
        (40, 47),
        (41, 46),
        (48, 54),
        (49, 53),
        (50, 52),
        (55, 59),
        (56, 58),
        (60, 64),
        (61, 63),
        (65, 67),
    ]
    for a, b in pairs:
        assert perm[a] == b and perm[b] == a, (a, b)
    for fixed in (8, 27, 28, 29, 30, 33, 51, 57, 62, 66):  # points on the face's axis
        assert perm[fixed] == fixed


def test_flipped_synthetic_face_keeps_left_eye_on_the_image_left():
    image, points, _ = render_face(np.random.default_rng(3), (200, 160), clean=True)
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped = flip_landmarks(points, image.width)
    for pts in (points, flipped):  # 36-41 is the eye on the image's left, before and after
        assert pts[36:42, 0].mean() < pts[42:48, 0].mean()
    assert np.allclose(flipped[36], [image.width - 1 - points[45, 0], points[45, 1]])
    # Each flipped label sits on the pixel its source point sat on, mirrored.
    src, dst = np.asarray(image), np.asarray(mirrored)
    for k in range(36, 48):
        x, y = np.round(points[FLIP_PERMUTATION[k]]).astype(int)
        fx, fy = np.round(flipped[k]).astype(int)
        assert (dst[fy, fx] == src[y, x]).all()


def test_flip_in_the_training_warp_swaps_indices_and_mirrors():
    image, points, bbox = render_face(np.random.default_rng(4), (200, 160), clean=True)
    pixels, uv, pixel_uv = _batch(Sample("face", _png(image), {"landmarks": points.tolist()}))
    plain = augment_batch(pixels, uv, pixel_uv, identity_params(1), CONTEXT)[1][0]
    params = identity_params(1)
    params["flip"][:] = True
    flipped = augment_batch(pixels, uv, pixel_uv, params, CONTEXT)[1][0]
    assert flipped[36:42, 0].mean() < flipped[42:48, 0].mean()
    # u -> 1 - u about the crop centre, with the half-pixel of the label convention kept.
    shift = 2 * 0.5 * float(pixel_uv[0]) * CONTEXT
    expected = 1 - plain[list(FLIP_PERMUTATION), 0] - shift
    assert torch.allclose(flipped[:, 0], expected, atol=1e-5)
    assert torch.allclose(flipped[:, 1], plain[list(FLIP_PERMUTATION), 1], atol=1e-6)


def test_identity_warp_reproduces_the_inference_crop_and_targets():
    image, points, bbox = render_face(np.random.default_rng(5), (240, 180))
    sample = Sample("face", _png(image), {"landmarks": points.tolist(), "bbox": bbox})
    _, direct, direct_uv, _, crop = LabelledReader(context=1.0).prepare(sample)
    pixels, uv, pixel_uv = _batch(sample)
    images, targets = augment_batch(pixels, uv, pixel_uv, identity_params(1), CONTEXT)
    assert np.allclose(direct_uv, (points - crop[:2]) / crop[2], atol=1e-6)
    assert np.abs(targets[0].numpy() - direct_uv).max() < 1e-5
    resampled = images[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(resampled - direct).mean() < 3  # two resamples instead of one: a little blur


def test_random_warps_keep_every_label_on_its_dot():
    """68 gaussian dots centred exactly on the labels (integer = pixel centre); after random
    flips, rotations, scales and shifts each target must sit on the centroid of its dot."""
    rng = np.random.default_rng(0)
    gx, gy = np.meshgrid(np.linspace(130, 270, 9), np.linspace(130, 270, 8))
    points = np.stack([gx.ravel(), gy.ravel()], 1)[:68] + rng.uniform(-3, 3, (68, 2))
    yy, xx = np.mgrid[0:400, 0:400]
    dots = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2)) for x, y in points)
    grey = (np.clip(dots, 0, 1) * 255).round().astype(np.uint8)
    sample = Sample(
        "dots", _png(Image.fromarray(np.stack([grey] * 3, -1))), {"landmarks": points.tolist()}
    )
    pixels, uv, pixel_uv = _batch(sample)
    cfg = AugmentConfig(
        flip_prob=0.5, max_rotation=30, max_scale=0.2, max_shift=0.1, colour_jitter=0, blur_prob=0
    )
    flips = 0
    for seed in range(6):
        params = sample_params(1, cfg, torch.Generator().manual_seed(seed))
        flips += int(params["flip"][0])
        images, targets = augment_batch(pixels, uv, pixel_uv, params, CONTEXT)
        out = images[0, 0].numpy()
        half = 0.5 * float(pixel_uv[0]) * CONTEXT / float(params["scale"][0])
        for u, v in targets[0].numpy():
            cx, cy = (u + half) * 224 - 0.5, (v + half) * 224 - 0.5  # output pixel index units
            x0, y0 = int(round(cx)), int(round(cy))
            if not (5 <= x0 < 219 and 5 <= y0 < 219):
                continue  # shifted out of the crop
            ys, xs = np.mgrid[y0 - 4 : y0 + 5, x0 - 4 : x0 + 5]
            w = out[y0 - 4 : y0 + 5, x0 - 4 : x0 + 5]
            assert np.hypot((w * xs).sum() / w.sum() - cx, (w * ys).sum() / w.sum() - cy) < 0.2
    assert 0 < flips < 6  # both branches were exercised


def test_colour_and_blur_change_pixels_not_labels():
    image, points, bbox = render_face(np.random.default_rng(6), (200, 160))
    pixels, uv, pixel_uv = _batch(Sample("f", _png(image), {"landmarks": points.tolist()}))
    params = identity_params(1)
    params.update(
        brightness=torch.tensor([1.2], dtype=torch.float64),
        saturation=torch.tensor([0.5], dtype=torch.float64),
        blur=torch.tensor([1.2], dtype=torch.float64),
    )
    plain_images, plain = augment_batch(pixels, uv, pixel_uv, identity_params(1), CONTEXT)
    images, targets = augment_batch(pixels, uv, pixel_uv, params, CONTEXT)
    assert torch.equal(plain, targets)
    assert (images - plain_images).abs().mean() > 0.01
    assert images.min() >= 0 and images.max() <= 1


def test_gaussian_blur_sigma_zero_is_identity_and_keeps_the_mean():
    x = torch.rand(2, 3, 32, 32)
    out = gaussian_blur(x, torch.tensor([0.0, 2.0]))
    assert torch.allclose(out[0], x[0], atol=1e-6)
    assert abs(float(out[1].mean() - x[1].mean())) < 0.01
    assert float(out[1].std()) < float(x[1].std())


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError, match="flip_prob"):
        AugmentConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match="max_scale"):
        AugmentConfig(max_scale=1.0)
    with pytest.raises(ValueError, match="68 points"):
        flip_landmarks(np.zeros((5, 2)), 10)
