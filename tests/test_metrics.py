"""NME, failure rate, AUC and regions against hand-computed values; the CED plot."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.model.metrics import (
    REGIONS,
    auc,
    ced_curve,
    failure_rate,
    nme,
    plot_ced,
    point_errors,
    region_nme,
    summarize,
)


def _face(iod: float = 10.0) -> np.ndarray:
    """68 points with the outer eye corners (36, 45) ``iod`` apart."""
    points = np.random.default_rng(0).uniform(0, 50, (68, 2))
    points[36], points[45] = (20.0, 30.0), (20.0 + iod, 30.0)
    return points


def test_nme_matches_a_hand_computed_example():
    target = _face(iod=10.0)
    pred = target.copy()
    pred[0] += (3.0, 4.0)  # 5 px off, a jaw point
    pred[30] += (0.0, 2.0)  # 2 px off, the nose tip
    # mean over 68 points of the distances, over the inter-ocular distance of 10 px
    assert nme(pred, target)[0] == pytest.approx((5 + 2) / 68 / 10, rel=1e-12)
    errors = point_errors(pred, target)[0]
    assert errors[0] == pytest.approx(0.5) and errors[30] == pytest.approx(0.2)
    regions = region_nme(pred, target)
    assert regions["jaw"][0] == pytest.approx(0.5 / 17)
    assert regions["nose"][0] == pytest.approx(0.2 / 9)
    assert regions["eyes"][0] == regions["brows"][0] == regions["mouth"][0] == 0


def test_nme_uses_the_label_eye_corners_and_is_scale_invariant():
    target = _face(iod=8.0)
    pred = target + 1.0  # every point sqrt(2) px off
    assert nme(pred, target)[0] == pytest.approx(np.sqrt(2) / 8)
    assert nme(pred * 3 + 7, target * 3 + 7)[0] == pytest.approx(nme(pred, target)[0])


def test_failure_rate_and_auc_by_hand():
    nmes = [0.02, 0.04, 0.10]
    assert failure_rate(nmes, 0.08) == pytest.approx(1 / 3)
    # AUC@0.08 = mean(max(0, 0.08 - e)) / 0.08 = (0.06 + 0.04 + 0) / 3 / 0.08
    assert auc(nmes, 0.08) == pytest.approx(0.1 / 3 / 0.08)
    errors, fractions = ced_curve(nmes, 0.08, steps=80001)
    assert np.trapezoid(fractions, errors) / 0.08 == pytest.approx(auc(nmes, 0.08), abs=1e-4)
    assert fractions[0] == 0 and fractions[-1] == pytest.approx(2 / 3)
    assert auc([0.0], 0.08) == 1.0 and auc([0.2], 0.08) == 0.0


def test_summarize_reports_every_number():
    target = np.stack([_face(), _face(20.0)])
    pred = target.copy()
    pred[1, 48:68] += (2.0, 0.0)  # the second face's mouth 2 px off: 0.1 of its 20 px IOD
    report = summarize(pred, target)
    assert report["samples"] == 2
    assert report["nme"] == pytest.approx(0.1 * 20 / 68 / 2)
    assert report["failure_rate@0.08"] == 0.0
    assert set(report["nme_by_region"]) == set(REGIONS)
    assert report["nme_by_region"]["mouth"] == pytest.approx(0.05)


def test_bad_inputs_are_refused():
    target = _face()
    same = target.copy()
    same[45] = same[36]
    with pytest.raises(ValueError, match="inter-ocular distance is 0"):
        nme(target, same)
    with pytest.raises(ValueError, match=r"\(N, 68, 2\)"):
        nme(np.zeros((5, 2)), np.zeros((5, 2)))


def test_ced_plot_is_a_png_with_the_curve(tmp_path):
    path = tmp_path / "ced.png"
    plot_ced({"val": [0.01, 0.03, 0.05, 0.2]}, str(path))
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (640, 480)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert ((pixels == (200, 30, 30)).all(1)).sum() > 200  # the first curve's colour
