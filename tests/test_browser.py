"""The headless-browser harness (tests/support/browser.py) sees what goes wrong on a page, and
reads a clean one back: figures, title and a screenshot of the requested width."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from support.browser import CHROMIUM, load_page

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=(
    "chromium is not installed (Debian package chromium; .ci/run installs it)"))


def test_a_broken_page_reports_each_kind_of_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("""<!doctype html><title>broken</title>
<script>console.error("planted")</script>
<script>throw new Error("planted throw")</script>
<img src="missing.png">""")
    result = load_page(page)
    errors = result.errors
    assert "console.error: planted" in errors, errors
    assert any(e.startswith("exception: Uncaught Error: planted throw") for e in errors), errors
    assert any(e.startswith("log: ") and "missing.png" in e for e in errors), errors
    assert len(errors) == 3, errors
    assert (tmp_path / "missing.png").as_uri() in result.requests


def test_a_clean_page_reads_back_with_a_screenshot(tmp_path):
    page = tmp_path / "clean.html"
    page.write_text("""<!doctype html><title>Clean report</title>
<p>Rows: <span data-figure="rows"> 42 </span></p>
<svg width="400" height="1200"><rect width="400" height="1200" fill="teal"/></svg>""")
    result = load_page(page, screenshot=True, width=800, height=600,
                       evaluate="document.querySelectorAll('svg rect').length")
    assert result.errors == []
    assert result.figures == {"rows": "42"}
    assert result.title == "Clean report"
    assert result.value == 1
    assert result.screenshot[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(result.screenshot))
    assert image.width == 800
    assert image.height > 1200  # the full page, beyond the 600 px viewport
