"""Procedurally rendered faces with exact iBUG-68 labels, written as WebDataset-style tar shards.

The pipeline needs an archive whose ground truth is known exactly (demos, tests, smoke runs
without downloading a real data set). Each face is drawn *along* the 68 landmark positions,
so the labels sit exactly on the rendered features whatever the pose or expression.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from pipeline.io.storage import filesystem


def _raw_points() -> tuple[np.ndarray, dict[str, slice]]:
    """3-D frontal face in raw units (x right, y down, z toward the camera).

    Rows 0-67 are the iBUG landmarks; further rows are drawing-only helpers (forehead,
    hair, ears, neck) that must follow the same pose but are never labelled.
    """
    t = np.linspace(0.0, np.pi, 17)
    jaw = np.stack([-np.cos(t) * (1 - 0.12 * np.sin(t) ** 2), -0.25 + 1.6 * np.sin(t)], 1)
    brow_l = [(-0.78, -0.50), (-0.64, -0.58), (-0.48, -0.61), (-0.32, -0.60), (-0.16, -0.55)]
    brow_r = [(-x, y) for x, y in reversed(brow_l)]
    nose = [(0, -0.38), (0, -0.14), (0, 0.10), (0, 0.34)]
    nostrils = [(-0.22, 0.44), (-0.11, 0.48), (0, 0.50), (0.11, 0.48), (0.22, 0.44)]
    eye_l = [(-0.64, -0.28), (-0.53, -0.36), (-0.38, -0.36), (-0.26, -0.27)]
    eye_l += [(-0.38, -0.21), (-0.53, -0.21)]
    # Mirroring swaps the corner order, so the right eye starts at its inner corner (42).
    eye_r = [(-x, y) for x, y in (eye_l[3], eye_l[2], eye_l[1], eye_l[0], eye_l[5], eye_l[4])]
    mouth = [(-0.36, 0.82), (-0.24, 0.75), (-0.10, 0.71), (0, 0.73), (0.10, 0.71), (0.24, 0.75)]
    mouth += [(0.36, 0.82), (0.24, 0.91), (0.11, 0.95), (0, 0.96), (-0.11, 0.95), (-0.24, 0.91)]
    inner = [(-0.30, 0.82), (-0.10, 0.815), (0, 0.815), (0.10, 0.815), (0.30, 0.82)]
    inner += [(0.10, 0.825), (0, 0.825), (-0.10, 0.825)]
    lm = np.concatenate([jaw, brow_l, brow_r, nose, nostrils, eye_l, eye_r, mouth, inner])
    # A rounded head: depth falls off towards the ears; eyes sit in sockets, the nose sticks out.
    z = 0.55 * np.sqrt(np.clip(1 - lm[:, 0] ** 2, 0, 1))
    z[36:48] -= 0.08
    z[27:31] += [0.08, 0.16, 0.26, 0.36]
    z[31:36] += [0.08, 0.14, 0.18, 0.14, 0.08]
    z[48:68] += 0.04
    a = np.linspace(0.0, np.pi, 13)[1:-1]  # right ear over the top to the left ear
    fore = np.stack([np.cos(a), -0.25 - 1.15 * np.sin(a)], 1)
    a = np.linspace(-0.12, np.pi + 0.12, 15)
    hair = np.stack([1.12 * np.cos(a), -0.25 - 1.35 * np.sin(a)], 1)
    ear = np.array([(1.0, -0.3), (1.12, -0.38), (1.17, -0.15), (1.1, 0.1), (0.98, 0.16)])
    neck = np.array([(-0.5, 0.9), (-0.55, 2.6), (0.55, 2.6), (0.5, 0.9)])
    extra = np.concatenate([fore, hair, ear * [-1, 1], ear, neck])
    hair_z = 0.45 * np.sqrt(np.clip(1 - (hair[:, 0] / 1.12) ** 2, 0, 1)) - 0.1
    ez = np.concatenate([0.5 * np.sqrt(1 - fore[:, 0] ** 2), hair_z, np.full(10, -0.05), [0] * 4])
    pts = np.concatenate([np.c_[lm, z], np.c_[extra, ez]])
    lo, hi = lm.min(0), lm.max(0)
    pts[:, :2] -= (lo + hi) / 2  # centre on the landmark box so TEMPLATE_68 is centred
    n, parts = 68, {}
    for name, k in (("fore", 11), ("hair", 15), ("ear_l", 5), ("ear_r", 5), ("neck", 4)):
        parts[name], n = slice(n, n + k), n + k
    return pts, parts


_POINTS, _PARTS = _raw_points()
TEMPLATE_68: np.ndarray = _POINTS[:68, :2].astype(np.float32)

_SKIN_LIGHT, _SKIN_DARK = np.array([242, 210, 185]), np.array([88, 58, 42])
_HAIR = np.array(
    [(22, 16, 14), (60, 40, 25), (110, 75, 40), (195, 155, 95), (150, 70, 35), (165, 165, 165)]
)
_IRIS = np.array([(70, 45, 25), (40, 30, 20), (70, 110, 160), (80, 120, 70), (110, 90, 50)])
_UPPER_LID, _LOWER_LID = [37, 38, 43, 44], [41, 40, 47, 46]


def _expression(rng: np.random.Generator, p: np.ndarray) -> None:
    """Deform the 3-D points in place: mouth opening, smile, brow raise, eye closure."""
    jaw_w = np.sin(np.linspace(0.0, np.pi, 17)) ** 2
    opening = rng.uniform(0.0, 0.35) if rng.random() < 0.5 else 0.0
    p[[55, 56, 57, 58, 59, 65, 66, 67], 1] += opening * np.array([0.7, 1, 1, 1, 0.7, 0.9, 1, 0.9])
    p[[48, 54, 60, 64], 1] += 0.35 * opening
    p[:17, 1] += 0.6 * opening * jaw_w  # the chin drops with the mouth
    p[_PARTS["neck"].start + np.array([0, 3]), 1] += 0.6 * opening
    smile = rng.uniform(-0.05, 0.12)
    p[[48, 54, 60, 64], 1] -= smile
    p[[48, 54, 60, 64], 0] *= 1 + 0.8 * smile
    p[[49, 53, 55, 59], 1] -= 0.4 * smile
    p[17:27, 1] -= rng.uniform(-0.04, 0.1)
    # Never fully shut: the pupil stays visible, which keeps the eye labels checkable.
    closure = rng.uniform(0.0, 0.5) if rng.random() < 0.3 else rng.uniform(0.0, 0.15)
    p[_UPPER_LID, 1] += closure * (p[_LOWER_LID, 1] - p[_UPPER_LID, 1])


def _project(p: np.ndarray, yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Orthographic view of the rotated head, in face units; rows as in ``p``."""
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    x = p[:, 0] * cy + p[:, 2] * sy
    z = -p[:, 0] * sy + p[:, 2] * cy
    y = p[:, 1] * cp - z * sp
    cr, sr = np.cos(roll), np.sin(roll)
    return np.stack([x * cr - y * sr, x * sr + y * cr], 1)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Gradient or flat colour plus random shapes, so the face is not on a trivial backdrop."""
    c0, c1 = rng.integers(0, 256, (2, 3))
    if rng.random() < 0.7:
        # A smooth ramp built tiny and upsampled costs far less than a full-size float ramp.
        ang, r = rng.uniform(0, 2 * np.pi), np.linspace(0, 1, 8)
        g = np.cos(ang) * r[None, :] + np.sin(ang) * r[:, None]
        g = (g - g.min()) / max(float(np.ptp(g)), 1e-6)
        small = Image.fromarray((c0 + g[..., None] * (c1 - c0)).astype(np.uint8), "RGB")
        img = small.resize((w, h), Image.Resampling.BILINEAR)
    else:
        img = Image.new("RGB", (w, h), tuple(int(c) for c in c0))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        kind, col = rng.integers(4), tuple(int(c) for c in rng.integers(0, 256, 3))
        xy = rng.uniform(-0.2, 1.2, (3, 2)) * (w, h)
        box = [*np.minimum(xy[0], xy[1]), *np.maximum(xy[0], xy[1])]
        if kind == 0:
            draw.rectangle(box, fill=col)
        elif kind == 1:
            draw.ellipse(box, fill=col)
        elif kind == 2:
            draw.line([tuple(q) for q in xy], fill=col, width=int(rng.integers(1, 6)))
        else:
            draw.polygon([tuple(q) for q in xy], fill=col)
    return img


def _tup(a: np.ndarray) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in a]


def _rgb(c: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(c, 0, 255))


def render_sample(
    rng: np.random.Generator, size: tuple[int, int] = (320, 240), *, clean: bool = False
) -> tuple[Image.Image, np.ndarray, list[float], dict[str, float]]:
    """Like :func:`render_face` but also returns the pose.

    ``pose`` holds ``roll`` (degrees, positive = clockwise in the image), ``yaw`` (degrees,
    positive = face turned towards image right), ``pitch`` (degrees, positive = chin up) and
    ``scale`` (nominal face width / image width). ``clean=True`` skips blur and noise (the
    geometry and colours are the same as without it) so tests can probe exact pixels.
    """
    w, h = size
    p = _POINTS.copy()
    _expression(rng, p)
    roll, yaw, pitch = rng.uniform(-30, 30), rng.uniform(-35, 35), rng.uniform(-12, 12)
    uv = _project(p, *np.radians([yaw, pitch, roll]))
    lo, hi = uv[:68].min(0), uv[:68].max(0)
    margin = 2.0
    # Template width is 2 units; shrink when the rotated face would not fit in the frame.
    scale = rng.uniform(0.3, 0.7)
    f = min(scale * w / 2, *((np.array([w, h]) - 1 - 2 * margin) / (hi - lo)))
    low = margin - lo * f
    t = low + rng.random(2) * np.maximum(np.array([w, h]) - 1 - margin - hi * f - low, 0)
    xy = uv * f + t
    lm = xy[:68].astype(np.float32)

    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    skin = _SKIN_LIGHT + rng.random() * (_SKIN_DARK - _SKIN_LIGHT) + rng.normal(0, 8, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 10, 3)
    iris = _IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 10, 3)
    lip = skin * [0.8, 0.58, 0.58] + [35, 0, 5] + rng.normal(0, 6, 3)
    white = np.array([238, 234, 228]) * rng.uniform(0.85, 1.0)
    lw = max(1, round(0.02 * f))

    draw.polygon(_tup(xy[_PARTS["neck"]]), fill=_rgb(skin * 0.78))
    for ear in ("ear_l", "ear_r"):
        draw.polygon(_tup(xy[_PARTS[ear]]), fill=_rgb(skin * 0.9), outline=_rgb(skin * 0.7))
    if rng.random() < 0.8:
        draw.polygon(_tup(xy[_PARTS["hair"]]), fill=_rgb(hair))
    draw.polygon(_tup(np.concatenate([xy[:17], xy[_PARTS["fore"]]])), fill=_rgb(skin))

    for b in (slice(17, 22), slice(22, 27)):
        draw.line(_tup(xy[b]), fill=_rgb(hair * 0.8), width=max(1, round(0.07 * f)), joint="curve")
    draw.line(_tup(xy[27:31]), fill=_rgb(skin * 0.86), width=lw)
    draw.line(_tup(xy[31:36]), fill=_rgb(skin * 0.6), width=lw, joint="curve")
    nr = max(0.8, 0.018 * f)
    for c in xy[[32, 34]]:
        draw.ellipse([c[0] - nr, c[1] - nr, c[0] + nr, c[1] + nr], fill=_rgb(skin * 0.35))

    gaze = rng.uniform(-1, 1, 2)
    for e in (slice(36, 42), slice(42, 48)):
        draw.polygon(_tup(xy[e]), fill=_rgb(white))
        c = xy[e].mean(0)
        half_open = 0.5 * np.linalg.norm(xy[e][1:3].mean(0) - xy[e][4:6].mean(0))
        ri = max(1.6, 0.95 * half_open)
        rp = max(1.6, 0.45 * ri)
        # The gaze shift stays below the pupil radius so the eye centre is always pupil.
        ci = c + gaze * 0.3 * ri
        draw.ellipse([*(ci - ri), *(ci + ri)], fill=_rgb(iris))
        draw.ellipse([*(ci - rp), *(ci + rp)], fill=(12, 10, 10))
        draw.line(_tup(xy[e][:4]), fill=_rgb(hair * 0.5), width=lw, joint="curve")
        draw.line(_tup(xy[e][[3, 4, 5, 0]]), fill=_rgb(skin * 0.55), width=1)

    outer, inner = xy[48:60], xy[60:68]
    draw.polygon(_tup(outer), fill=_rgb(lip))
    gap = np.linalg.norm(inner[[1, 2, 3]] - inner[[7, 6, 5]], axis=1).mean()
    if gap > 1.5:
        draw.polygon(_tup(inner), fill=(45, 12, 15))
        if gap > 0.08 * f:  # wide enough to show the upper teeth
            top = inner[:5]
            low = np.concatenate([inner[:1], inner[[7, 6, 5]], inner[4:5]])
            teeth = np.concatenate([top, (top + 0.3 * (low - top))[::-1]])
            draw.polygon(_tup(teeth), fill=(235, 232, 220))
    else:
        draw.line(_tup(inner[:5]), fill=_rgb(lip * 0.55), width=lw)

    radius, sigma = rng.uniform(0, 1.5), rng.uniform(0, 8)
    noise = rng.bytes(w * h * 3)  # drawn even when clean, so both modes consume rng alike
    if not clean:
        img = img.filter(ImageFilter.GaussianBlur(radius))
        # Uniform bytes mapped through a LUT: zero-mean noise of std ``sigma`` around 128,
        # far cheaper than float gaussian noise in numpy on this size of image.
        lut = np.round(128 + ((np.arange(256) + 0.5) / 128 - 1) * sigma * np.sqrt(3))
        noise_img = Image.frombytes("RGB", (w, h), noise).point(lut.astype(int).tolist() * 3)
        img = ImageChops.add(img, noise_img, 1.0, -128)
    bbox = [float(v) for v in (*lm.min(0), *lm.max(0))]
    pose = {"roll": float(roll), "yaw": float(yaw), "pitch": float(pitch)}
    pose["scale"] = float(2 * f / w)
    return img, lm, bbox, pose


def render_face(
    rng: np.random.Generator, size: tuple[int, int] = (320, 240), *, clean: bool = False
) -> tuple[Image.Image, np.ndarray, list[float]]:
    """Render one random synthetic face.

    Returns ``(image, landmarks, bbox)``: an RGB image of the given ``(width, height)``, the
    68 iBUG landmarks as float32 ``(68, 2)`` 0-based pixel coordinates (integer = pixel
    centre) after every geometric transform, and ``[x0, y0, x1, y1]``, the tight box of the
    landmarks. All randomness comes from ``rng``. ``clean=True`` skips blur and noise.
    """
    img, lm, bbox, _ = render_sample(rng, size, clean=clean)
    return img, lm, bbox


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed: byte-identical reruns
    tar.addfile(info, io.BytesIO(data))


def write_sample_archive(
    output_uri: str,
    num_shards: int = 4,
    samples_per_shard: int = 16,
    *,
    seed: int = 0,
    image_size: tuple[int, int] = (320, 240),
    jpeg_quality: tuple[int, int] = (60, 95),
    storage_options: dict | None = None,
) -> list[str]:
    """Write a synthetic labelled archive as WebDataset-style tar shards.

    Shards are ``faces-00000.tar``, ``faces-00001.tar`` ... under ``output_uri`` (a folder or
    any fsspec URL prefix; created if needed). Each sample ``face-SSSSS-IIIII`` is a ``.jpg``
    followed by a ``.json`` sidecar holding ``landmarks`` (68 ``[x, y]`` pairs), ``bbox``,
    ``scheme``, ``source``, ``seed`` and ``pose``. Sample ``i`` of shard ``s`` draws from
    ``np.random.default_rng([seed, s, i])``, so equal arguments give byte-identical shards.
    The JPEG quality is drawn uniformly from the inclusive range ``jpeg_quality``.
    Returns the shard URIs, sorted.
    """
    fs, path = filesystem(output_uri, storage_options)
    fs.makedirs(path, exist_ok=True)
    uris = []
    for s in range(num_shards):
        name = f"faces-{s:05d}.tar"
        with (
            fs.open(f"{path.rstrip('/')}/{name}", "wb") as f,
            tarfile.open(fileobj=f, mode="w") as tar,
        ):
            for i in range(samples_per_shard):
                rng = np.random.default_rng([seed, s, i])
                img, lm, _, pose = render_sample(rng, image_size)
                buf = io.BytesIO()
                quality = int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1))
                img.save(buf, "JPEG", quality=quality)
                # Round first and derive the bbox from the rounded points so they agree exactly.
                pts = np.round(lm.astype(np.float64), 3)
                meta = {
                    "landmarks": pts.tolist(),
                    "bbox": [*pts.min(0).tolist(), *pts.max(0).tolist()],
                    "scheme": "ibug68",
                    "source": "synthetic",
                    "seed": seed,
                    "pose": {k: round(v, 3) for k, v in pose.items()},
                }
                key = f"face-{s:05d}-{i:05d}"
                _add(tar, f"{key}.jpg", buf.getvalue())
                _add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
        uris.append(f"{output_uri.rstrip('/')}/{name}")
    return sorted(uris)
