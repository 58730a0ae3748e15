"""The heatmap overlay: exact layout, colours where the heatmap is high, grey where it is not, circles drawn."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
from PIL import Image

from common.overlay import CIRCLE_COLOUR, COLORBAR_WIDTH, MIN_HEIGHT, TITLE_HEIGHT, overlay_png
from common.records import LesionCircle


def decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def test_layout_hot_block_and_grey_elsewhere():
    grey = np.full((200, 100), 0.5, dtype=np.float32)
    heatmap = np.zeros_like(grey)
    heatmap[40:80, 20:60] = 1.0
    out = decode(overlay_png(grey, heatmap, display_side=400, max_alpha=0.6))
    # longer side 200 -> 400: the image is 200 x 400 (w x h), the colour bar to its right
    assert out.shape == (400, 200 + COLORBAR_WIDTH, 3)
    hot = np.asarray(matplotlib.colormaps["turbo"](1.0)[:3])
    expected = np.rint((0.4 * 0.5 + 0.6 * hot) * 255)
    np.testing.assert_allclose(out[100:150, 50:110], np.broadcast_to(expected, (50, 60, 3)), atol=1)
    assert (out[250:400, :200] == 128).all()  # heatmap 0: the grey pixel, unchanged (0.5 -> 128)
    assert (out[:, :200, 0] != out[:, :200, 2]).sum() > 0.9 * 80 * 80  # coloured only around the block
    assert ((out[:, :200, 0] != out[:, :200, 2]).sum(axis=1)[250:] == 0).all()


def test_value_range_and_auto_range():
    grey = np.zeros((10, 10), dtype=np.float32)
    heatmap = np.full((10, 10), 0.2, dtype=np.float32)
    heatmap[:, 5:] = 0.4
    fixed = decode(overlay_png(grey, heatmap, display_side=10, vmin=0.0, vmax=1.0))[:10, :10]
    auto = decode(overlay_png(grey, heatmap, display_side=10, vmin=None, vmax=None))[:10, :10]
    lut = matplotlib.colormaps["turbo"]
    np.testing.assert_allclose(fixed[5, 8], np.rint(0.6 * 0.4 * np.asarray(lut(0.4)[:3]) * 255), atol=1)
    assert (auto[:, :3] == 0).all()  # the minimum of an auto range is drawn as the grey pixel (black here)
    np.testing.assert_allclose(auto[5, 8], np.rint(0.6 * np.asarray(lut(1.0)[:3]) * 255), atol=1)


def test_circles_and_title():
    grey = np.full((100, 100), 0.25, dtype=np.float32)
    png = overlay_png(grey, np.zeros_like(grey), circles=[LesionCircle(x=50.0, y=50.0, r=20.0)], title="mdb005",
                      display_side=200)
    out = decode(png)
    assert out.shape == (TITLE_HEIGHT + 200, 200 + COLORBAR_WIDTH, 3)
    image = out[TITLE_HEIGHT:]
    magenta = (image[:, :200] == CIRCLE_COLOUR).all(axis=2)
    rows, cols = np.nonzero(magenta)
    radius = np.hypot(rows - 100.5, cols - 100.5)  # centre (50, 50) -> 100.5 at scale 2
    assert magenta.sum() > 200 and (np.abs(radius - 40) < 2.5).all()
    assert (image[100, 100] == 64).all()  # inside the circle: untouched grey
    assert (out[:TITLE_HEIGHT].min(axis=2) < 100).any()  # the title's text is drawn


def test_small_image_gets_a_readable_colour_bar_and_errors():
    out = decode(overlay_png(np.zeros((8, 8), np.uint8), np.zeros((8, 8)), display_side=64))
    assert out.shape == (MIN_HEIGHT, 64 + COLORBAR_WIDTH, 3)
    with pytest.raises(ValueError, match=r"heatmap shape \(8, 9\) differs from the image's \(8, 8\)"):
        overlay_png(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match="NaN"):
        overlay_png(np.zeros((8, 8)), np.full((8, 8), np.nan))
