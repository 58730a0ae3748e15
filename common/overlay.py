"""A heatmap drawn over the grey mammogram, as PNG bytes: screening, the run report's gallery and the notebook.

Layout (pixels of the returned PNG, origin top-left), so that callers and tests can find every part:

- a title band of ``TITLE_HEIGHT`` rows at the top when a title is given (none otherwise);
- the image below it at column 0: the original scaled (bilinear) so that its longer side is ``display_side``;
- the colour bar, ``COLORBAR_WIDTH`` columns to the right of the image, with the values at its ends and middle
  and the ``label`` written along it. The canvas is at least ``MIN_HEIGHT`` rows high below the title, and
  wider than image + colour bar only when the title needs it (white on the right).

Colouring: the grey image (``common.preprocessing.as_unit_float``) is blended with the colour map's colour of
each heatmap value, with opacity ``max_alpha`` x the value's position in [vmin, vmax]: a value at or below vmin
leaves the grey pixel as it is, a value at vmax is drawn at ``max_alpha``. Lesion circles (original pixel
coordinates, ``common.records.LesionCircle``) are drawn as ``CIRCLE_COLOUR`` outlines.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.preprocessing import as_unit_float
from common.records import LesionCircle

TITLE_HEIGHT = 28
COLORBAR_WIDTH = 96
MIN_HEIGHT = 160
CIRCLE_COLOUR = (255, 0, 255)  # magenta: absent from the colour map, visible on grey
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
_BAR_LEFT, _BAR_WIDTH, _BAR_MARGIN = 8, 18, 14  # inside the colour-bar area


def overlay_png(original_pixels: np.ndarray, heatmap: np.ndarray, *, circles: Sequence[LesionCircle] = (),
                title: str | None = None, label: str = "", vmin: float | None = 0.0, vmax: float | None = 1.0,
                display_side: int = 768, max_alpha: float = 0.6, cmap: str = "turbo") -> bytes:
    """The overlay as PNG bytes (see the module doc for the layout).

    ``original_pixels``: the 2-D image as read (bright = dense tissue); ``heatmap``: the same shape, e.g.
    ``Prediction.on_original(...)``. ``vmin``/``vmax`` fix the colour scale (default [0, 1], for probabilities);
    None takes the heatmap's own minimum / maximum (attributions).
    """
    return png_bytes(overlay_image(original_pixels, heatmap, circles=circles, title=title, label=label, vmin=vmin,
                                   vmax=vmax, display_side=display_side, max_alpha=max_alpha, cmap=cmap))


def overlay_image(original_pixels: np.ndarray, heatmap: np.ndarray, *, circles: Sequence[LesionCircle] = (),
                  title: str | None = None, label: str = "", vmin: float | None = 0.0, vmax: float | None = 1.0,
                  display_side: int = 768, max_alpha: float = 0.6, cmap: str = "turbo") -> Image.Image:
    """The overlay as an RGB ``PIL.Image`` (arguments as :func:`overlay_png`)."""
    grey = as_unit_float(original_pixels)
    values = np.asarray(heatmap, dtype=np.float32)
    if values.shape != grey.shape:
        raise ValueError(f"heatmap shape {values.shape} differs from the image's {grey.shape}")
    if not np.isfinite(values).all():
        raise ValueError("heatmap contains NaN or infinite values")
    if display_side < 1 or not 0.0 <= max_alpha <= 1.0:
        raise ValueError(f"display_side must be >= 1 and max_alpha in [0, 1], got {display_side}, {max_alpha}")
    low = float(values.min()) if vmin is None else float(vmin)
    high = float(values.max()) if vmax is None else float(vmax)
    scale = display_side / max(grey.shape)
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))  # (width, height)
    grey_small = _resized(grey, size)
    level = _resized(values, size)
    level = np.clip((level - low) / (high - low), 0.0, 1.0) if high > low else (level > low).astype(np.float32)
    colours = _lookup(cmap)[np.rint(level * 255).astype(np.int32)]
    alpha = (max_alpha * level)[..., None]
    rgb = (1.0 - alpha) * grey_small[..., None] + alpha * colours
    image = Image.fromarray(np.rint(rgb * 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for circle in circles:
        x, y, r = (circle.x + 0.5) * scale - 0.5, (circle.y + 0.5) * scale - 0.5, max(circle.r * scale, 2.0)
        draw.ellipse((x - r, y - r, x + r, y + r), outline=CIRCLE_COLOUR, width=2)
    top = TITLE_HEIGHT if title else 0
    width = size[0] + COLORBAR_WIDTH
    if title:  # a long title widens the canvas rather than being cut
        width = max(width, int(np.ceil(_font(15).getlength(title))) + 12)
    canvas = Image.new("RGB", (width, top + max(size[1], MIN_HEIGHT)), BACKGROUND)
    canvas.paste(image, (0, top))
    _draw_colorbar(canvas, left=size[0], top=top, cmap=cmap, low=low, high=high, label=label)
    if title:
        ImageDraw.Draw(canvas).text((6, TITLE_HEIGHT // 2), title, fill=TEXT_COLOUR, font=_font(15), anchor="lm")
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _resized(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 array resized to (width, height): bilinear, with Pillow's antialiasing when shrinking."""
    if (array.shape[1], array.shape[0]) == size:
        return array.astype(np.float32)
    return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR),
                      dtype=np.float32)


def _lookup(cmap: str) -> np.ndarray:
    """(256, 3) RGB in [0, 1] of a matplotlib colour map."""
    return np.asarray(matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256)))[:, :3]


def _draw_colorbar(canvas: Image.Image, *, left: int, top: int, cmap: str, low: float, high: float,
                   label: str) -> None:
    height = canvas.height - top - 2 * _BAR_MARGIN
    ramp = _lookup(cmap)[np.rint(np.linspace(255, 0, height)).astype(np.int32)]  # top = high
    bar = np.repeat((ramp * 255).astype(np.uint8)[:, None, :], _BAR_WIDTH, axis=1)
    x0, y0 = left + _BAR_LEFT, top + _BAR_MARGIN
    canvas.paste(Image.fromarray(bar, mode="RGB"), (x0, y0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x0 - 1, y0 - 1, x0 + _BAR_WIDTH, y0 + height), outline=TEXT_COLOUR)
    font = _font(12)
    for fraction, value in ((0.0, high), (0.5, (low + high) / 2), (1.0, low)):
        y = y0 + fraction * (height - 1)
        draw.line((x0 + _BAR_WIDTH, y, x0 + _BAR_WIDTH + 3, y), fill=TEXT_COLOUR)
        draw.text((x0 + _BAR_WIDTH + 5, y), f"{value:.3g}", fill=TEXT_COLOUR, font=font, anchor="lm")
    if label:
        text = Image.new("RGB", (height, 16), BACKGROUND)
        ImageDraw.Draw(text).text((height // 2, 8), label, fill=TEXT_COLOUR, font=font, anchor="mm")
        canvas.paste(text.rotate(90, expand=True), (left + COLORBAR_WIDTH - 18, y0))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)
