"""report.html in a real headless Chromium (tests/headless_chromium.py): it loads with no console error, every
image decodes, nothing is fetched from outside the file, and the first screen is not blank.

Chromium comes from the project's set-up (`make install` installs Debian's `chromium`). Without it these tests
fail when CI is set and skip elsewhere.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from common import html_page as h
from headless_chromium import find_chromium, view_page
from sample_run import write_sample_run
from server.report import FIGURE_FILES, build_report


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        message = "chromium is not installed (`make install` installs it: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def screenshot_pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize("hostile", [False, True], ids=["plain", "hostile-strings"])
def test_report_loads_cleanly_in_chromium(chromium, tmp_path, hostile):
    sample = write_sample_run(tmp_path / "run", hostile=hostile)
    page = build_report(sample.path)
    view = view_page(page.as_uri(), chromium=chromium)
    assert view.console_errors == []
    assert view.title == f"MammoFL run report: {sample.path.name}"
    assert len(view.images) == len(FIGURE_FILES) + 1 + 3  # figures, partition plot, gallery
    assert view.undecoded_images == []
    assert all(i["naturalWidth"] >= 64 and i["naturalHeight"] >= 48 for i in view.images)
    schemes = {url.split(":", 1)[0] for url in view.requests}
    assert schemes <= {"file", "data"}, view.requests
    for heading in ("Training curves", "Final metrics", "Confusion matrix at the operating point", "Hospitals",
                    "Gallery of test predictions", "Model card"):
        assert heading in view.text
    if hostile:
        assert 'alert("x")' in view.text  # shown as text, never run (a run would have no console error here)
    shot = screenshot_pixels(view.screenshot)
    assert shot.shape == (900, 1280, 3)
    assert shot.std() > 20  # text and a figure, not a blank page
    assert (shot.min(axis=-1) < 80).mean() > 0.005  # dark text on the first screen


def test_the_harness_sees_broken_images_and_script_errors(chromium, tmp_path):
    """The checks above can fail: a page with an undecodable image and a failing script is caught."""
    page = h.Page(title="broken")
    page.section("s", h.paragraph("x"))
    text = page.render()
    broken = (text.replace("<meta http-equiv=\"Content-Security-Policy\"", "<meta name=\"x\"")
              .replace("</main>", '<img alt="bad" src="data:image/png;base64,iVBORw0KGgoAAAAA">'
                                  "<script>undefinedFunction()</script></main>"))
    path = tmp_path / "broken.html"
    path.write_text(broken)
    view = view_page(path.as_uri(), chromium=chromium)
    assert [i["alt"] for i in view.undecoded_images] == ["bad"]
    assert any("undefinedFunction" in e for e in view.console_errors), view.console_errors
    # the report's policy blocks any script: the same script with the policy in place is refused, loudly
    path.write_text(text.replace("</main>", "<script>undefinedFunction()</script></main>"))
    view = view_page(path.as_uri(), chromium=chromium)
    assert any("Content Security Policy" in e for e in view.console_errors), view.console_errors
