"""Landmark accuracy: inter-ocular NME, failure rate, AUC, NME per face region, CED plot.

Conventions of the 300-W benchmark: the error of a sample is the mean over its 68 points of the
Euclidean distance between prediction and label, divided by the distance between the outer eye
corners (iBUG points 36 and 45) of the label. A sample *fails* when its NME is above the threshold
(0.08 by default). The cumulative error distribution (CED) gives, for each error ``e``, the fraction
of samples with NME <= ``e``; AUC@T is the area under it from 0 to T divided by T, which equals the
mean of ``max(0, T - nme) / T`` exactly (no sampling of the curve).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.model.geometry import NUM_LANDMARKS

DEFAULT_THRESHOLD = 0.08
REGIONS: dict[str, tuple[int, int]] = {  # [start, stop) of each iBUG region
    "jaw": (0, 17),
    "brows": (17, 27),
    "nose": (27, 36),
    "eyes": (36, 48),
    "mouth": (48, 68),
}
OUTER_EYE_CORNERS = (36, 45)


def _points(a: Any, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"{name} must be (N, 68, 2) points, got shape {a.shape}")
    return a


def point_errors(pred: Any, target: Any) -> np.ndarray:
    """(N, 68) distances between predicted and labelled points over the inter-ocular distance."""
    pred, target = _points(pred, "pred"), _points(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    left, right = OUTER_EYE_CORNERS
    iod = np.linalg.norm(target[:, left] - target[:, right], axis=1)
    if (iod <= 0).any():
        raise ValueError(
            f"{int((iod <= 0).sum())} sample(s) have points 36 and 45 at the same "
            "place: the inter-ocular distance is 0"
        )
    return np.linalg.norm(pred - target, axis=2) / iod[:, None]


def nme(pred: Any, target: Any) -> np.ndarray:
    """Inter-ocular NME per sample, shape (N,)."""
    return point_errors(pred, target).mean(axis=1)


def region_nme(pred: Any, target: Any) -> dict[str, np.ndarray]:
    """NME per sample restricted to each region (jaw, brows, nose, eyes, mouth)."""
    errors = point_errors(pred, target)
    return {name: errors[:, a:b].mean(axis=1) for name, (a, b) in REGIONS.items()}


def failure_rate(nmes: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> float:
    """Fraction of samples whose NME is above ``threshold``."""
    nmes = np.asarray(nmes, dtype=np.float64)
    return float((nmes > threshold).mean()) if nmes.size else float("nan")


def auc(nmes: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> float:
    """Area under the CED curve from 0 to ``threshold``, normalised to [0, 1]."""
    nmes = np.asarray(nmes, dtype=np.float64)
    if not nmes.size:
        return float("nan")
    return float(np.clip(threshold - nmes, 0.0, None).mean() / threshold)


def ced_curve(
    nmes: Sequence[float], threshold: float = DEFAULT_THRESHOLD, steps: int = 401
) -> tuple[np.ndarray, np.ndarray]:
    """``(errors, fraction of samples with NME <= error)`` on ``steps`` points of [0, threshold]."""
    nmes = np.sort(np.asarray(nmes, dtype=np.float64))
    errors = np.linspace(0.0, threshold, steps)
    fractions = np.searchsorted(nmes, errors, side="right") / max(len(nmes), 1)
    return errors, fractions


def summarize(pred: Any, target: Any, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """The evaluation numbers of a set of samples, as a JSON-ready dict."""
    per_sample = nme(pred, target)
    regions = region_nme(pred, target)
    return {
        "samples": int(per_sample.size),
        "nme": float(per_sample.mean()) if per_sample.size else float("nan"),
        "nme_median": float(np.median(per_sample)) if per_sample.size else float("nan"),
        f"failure_rate@{threshold:g}": failure_rate(per_sample, threshold),
        f"auc@{threshold:g}": auc(per_sample, threshold),
        "nme_by_region": {
            k: float(v.mean()) if v.size else float("nan") for k, v in regions.items()
        },
    }


def plot_ced(
    curves: Mapping[str, Sequence[float]],
    uri: str,
    threshold: float = DEFAULT_THRESHOLD,
    storage_options: Mapping[str, Any] | None = None,
    size: tuple[int, int] = (640, 480),
) -> None:
    """Draw the CED curve of each named NME list to a PNG at any fsspec URI (PIL, no matplotlib)."""
    import io

    from PIL import Image, ImageDraw

    from pipeline.io.storage import write_bytes

    width, height = size
    left, right, top, bottom = 60, 20, 30, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = width - left - right, height - top - bottom

    def at(error: float, fraction: float) -> tuple[float, float]:
        return left + error / threshold * plot_w, top + (1 - fraction) * plot_h

    for i in range(5):  # grid and tick labels every 20 % of each axis
        x, y = at(threshold * i / 4, i / 4)
        draw.line([(x, top), (x, top + plot_h)], fill=(225, 225, 225))
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((x - 12, top + plot_h + 6), f"{threshold * i / 4:.3f}", fill="black")
        draw.text((left - 30, y - 6), f"{i / 4:.2f}", fill="black")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    draw.text((left + plot_w / 2 - 70, height - 20), "NME (inter-ocular)", fill="black")
    draw.text((left, 8), "fraction of images with NME <= x", fill="black")
    colours = [(200, 30, 30), (30, 90, 200), (30, 150, 60), (160, 60, 160), (220, 130, 0)]
    for n, (name, nmes) in enumerate(curves.items()):
        errors, fractions = ced_curve(nmes, threshold)
        colour = colours[n % len(colours)]
        draw.line([at(e, f) for e, f in zip(errors, fractions, strict=True)], fill=colour, width=2)
        label = f"{name}: AUC {auc(nmes, threshold):.3f}, n={len(nmes)}"
        draw.text((left + plot_w - 230, top + plot_h - 20 - 14 * n), label, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    write_bytes(uri, buffer.getvalue(), storage_options)
