"""Mammogram preprocessing, identical at every site: segment, crop, flip, resize, pad.

Order of processing (pure numpy/scipy, deterministic: the same pixels and config give the same bytes):

1. **Segment the breast** (:func:`segment_breast`): quantise to ``config.levels`` grey levels, threshold at
   ``config.threshold_factor`` times the Otsu level (never below ``config.min_threshold``), open with a square
   of half-width ``config.opening_radius`` x the longer image side (5 px on a 1024-px image; cuts thin bridges to
   film edges and labels), keep the largest 8-connected component and fill its holes. Background, film edges and burnt-in film
   labels, which are separate bright blobs, fall outside the mask. Equal-sized largest components are kept
   together, so the result never depends on scan order (and so a mirrored image gives the mirrored mask).
2. **Crop** to the bounding box of the mask; pixels outside the mask become 0.
3. **Flip** horizontally when needed so that the breast lies on the LEFT, chest wall at the left edge. The side
   comes from ``breast_side`` when the caller knows it (file header, data-set convention); otherwise from the mask:
   the half of the image holding more breast pixels (a tie counts as "left"). Images that fill the frame can fool
   the mask test, so pass the side when the source tells it.
4. **Resize** keeping the aspect ratio so the crop fits ``config.size`` x ``config.size`` (bilinear; Gaussian
   anti-aliasing first when shrinking, sigma = (factor - 1) / 2 per axis).
5. **Pad** to ``size`` x ``size`` with zeros: the breast stays against the left edge, centred vertically.
6. **Output** float32 in [0, 1], exactly 0 outside the (resized) breast mask.

Steps 2-5 are one :class:`Geometry`, which also maps annotations made on the original image (points, lesion
circles, ROI masks) into the output frame. Coordinates are pixel indices, ``x`` = column, ``y`` = row, origin
top-left, pixel centres on integers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from common.records import LesionCircle
from common.run_config import TrainingSettings

logger = logging.getLogger(__name__)

#: Bump whenever the algorithm changes in a way that changes outputs: it is part of every cache key.
ALGORITHM_VERSION = 1

_SIDES = ("left", "right")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides the preprocessed pixels; its :meth:`fingerprint` keys caches."""

    size: int = TrainingSettings.image_size  # the run config's default, declared once in common.run_config
    levels: int = 256  # grey levels used for thresholding
    threshold_factor: float = 0.4  # threshold = factor x Otsu level (Otsu alone cuts the fatty periphery)
    min_threshold: float = 0.02  # absolute floor of the threshold, in [0, 1] units
    opening_radius: float = 0.005  # half-width of the opening's square, as a fraction of the longer image side
    antialias: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        if not isinstance(self.levels, int) or not 2 <= self.levels <= 65536:
            raise ValueError(f"levels must be an int in [2, 65536], got {self.levels!r}")
        if not 0.0 < self.threshold_factor <= 1.0:
            raise ValueError(f"threshold_factor must be in (0, 1], got {self.threshold_factor!r}")
        if not 0.0 <= self.min_threshold < 1.0:
            raise ValueError(f"min_threshold must be in [0, 1), got {self.min_threshold!r}")
        if not 0.0 <= self.opening_radius < 0.5:
            raise ValueError(f"opening_radius must be in [0, 0.5), got {self.opening_radius!r}")

    def fingerprint(self) -> str:
        """A stable hex digest of the algorithm version and every field (same in every process and site)."""
        payload = json.dumps({"algorithm": ALGORITHM_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Geometry:
    """Crop -> flip -> resize -> pad, from an original image of ``in_shape`` to a ``size`` x ``size`` frame.

    The crop is rows ``[top, top + height)`` and columns ``[left, left + width)``; it is resized to
    ``out_height`` x ``out_width`` and placed at row ``pad_top``, column 0 of the output.
    """

    in_shape: tuple[int, int]
    top: int
    left: int
    height: int
    width: int
    flipped: bool
    out_height: int
    out_width: int
    pad_top: int
    size: int

    @classmethod
    def fit(cls, in_shape: tuple[int, int], box: tuple[int, int, int, int], *, flipped: bool, size: int) -> Geometry:
        """The geometry that fits crop ``box`` = (top, left, height, width) into ``size`` x ``size``."""
        top, left, height, width = box
        scale = min(size / height, size / width)
        out_height = min(size, max(1, round(height * scale)))
        out_width = min(size, max(1, round(width * scale)))
        return cls(
            in_shape=(int(in_shape[0]), int(in_shape[1])),
            top=int(top),
            left=int(left),
            height=int(height),
            width=int(width),
            flipped=bool(flipped),
            out_height=int(out_height),
            out_width=int(out_width),
            pad_top=(size - out_height) // 2,
            size=int(size),
        )

    @property
    def scale_x(self) -> float:
        return self.out_width / self.width

    @property
    def scale_y(self) -> float:
        return self.out_height / self.height

    def map_point(self, x: float, y: float) -> tuple[float, float]:
        """Original (column, row) -> output (column, row); may fall outside the output for cropped-away points."""
        u = x - self.left
        if self.flipped:
            u = (self.width - 1) - u
        v = y - self.top
        return (u + 0.5) * self.scale_x - 0.5, (v + 0.5) * self.scale_y - 0.5 + self.pad_top

    def map_circle(self, circle: LesionCircle) -> LesionCircle:
        """A lesion circle in output coordinates; the radius scales by the geometric mean of both axis scales."""
        x, y = self.map_point(circle.x, circle.y)
        return LesionCircle(x=x, y=y, r=circle.r * float(np.sqrt(self.scale_x * self.scale_y)))

    def map_mask(self, mask: np.ndarray) -> np.ndarray:
        """A boolean mask of the original image (e.g. an ROI) in the output frame: bool (size, size).

        Resampled bilinearly and thresholded at 0.5, exactly as the breast mask is.
        """
        mask = np.asarray(mask)
        self._check_shape(mask)
        return self.warp(mask.astype(np.float32), antialias=False) >= 0.5

    def warp(self, array: np.ndarray, *, antialias: bool) -> np.ndarray:
        """Apply crop, flip, resize and zero padding to a float array of the original shape."""
        self._check_shape(array)
        rows, cols = slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)
        crop = np.asarray(array, dtype=np.float32)[rows, cols]
        if self.flipped:
            crop = crop[:, ::-1]
        step = (self.height / self.out_height, self.width / self.out_width)  # input pixels per output pixel
        crop = np.ascontiguousarray(crop)
        if antialias and max(step) > 1.0:
            crop = ndimage.gaussian_filter(crop, sigma=[max(0.0, (s - 1.0) / 2.0) for s in step], mode="nearest")
        resized = ndimage.affine_transform(
            crop,
            matrix=step,
            offset=[0.5 * s - 0.5 for s in step],
            output_shape=(self.out_height, self.out_width),
            order=1,
            mode="nearest",
        )
        out = np.zeros((self.size, self.size), dtype=np.float32)
        out[self.pad_top : self.pad_top + self.out_height, : self.out_width] = resized
        return out

    def unwarp(self, array: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`warp` for maps made in the output frame (heatmaps, cell scores): an array of
        the original shape; pixels outside the crop are 0.

        Unpad, resize the ``out_height`` x ``out_width`` area back to the crop's size (bilinear, same pixel-centre
        convention as :meth:`map_point`), unflip, and place it at the crop's position.
        """
        array = np.asarray(array, dtype=np.float32)
        if array.shape != (self.size, self.size):
            raise ValueError(f"expected an array of the output shape {(self.size, self.size)}, got {array.shape}")
        area = np.ascontiguousarray(array[self.pad_top : self.pad_top + self.out_height, : self.out_width])
        step = (self.out_height / self.height, self.out_width / self.width)  # output pixels per input pixel
        crop = ndimage.affine_transform(area, matrix=step, offset=[0.5 * s - 0.5 for s in step],
                                        output_shape=(self.height, self.width), order=1, mode="nearest")
        if self.flipped:
            crop = crop[:, ::-1]
        out = np.zeros(self.in_shape, dtype=np.float32)
        out[self.top : self.top + self.height, self.left : self.left + self.width] = crop
        return out

    def to_dict(self) -> dict[str, int | bool | list[int]]:
        return {**asdict(self), "in_shape": list(self.in_shape)}

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        return cls(**{**data, "in_shape": tuple(int(v) for v in data["in_shape"])})

    def _check_shape(self, array: np.ndarray) -> None:
        if array.shape != self.in_shape:
            raise ValueError(f"expected an array of the original shape {self.in_shape}, got {array.shape}")


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """The model's view of one image: ``image`` float32 (size, size) in [0, 1], 0 outside ``breast_mask``."""

    image: np.ndarray
    breast_mask: np.ndarray
    geometry: Geometry
    breast_side: str  # where the breast lay in the original pixel array: "left" / "right"


def preprocess(pixels: np.ndarray, *, breast_side: str | None, config: PreprocessConfig) -> Preprocessed:
    """Segment, crop, flip to the left, resize and pad one image (see the module docstring for the order).

    ``pixels``: 2-D, bright = dense tissue; floats are clipped to [0, 1], integers scaled by their dtype's maximum.
    ``breast_side``: "left" / "right" where the caller knows where the breast lies in ``pixels``, else None.
    """
    if breast_side not in (None, *_SIDES):
        raise ValueError(f"breast_side must be 'left', 'right' or None, got {breast_side!r}")
    image = as_unit_float(pixels)
    mask = segment_breast(image, config)
    side = breast_side or side_from_mask(mask)
    if mask.any():
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        box = (rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    else:
        logger.warning("no breast found (blank image): output is all zeros")
        box = (0, 0, *image.shape)
    geometry = Geometry.fit(image.shape, box, flipped=side == "right", size=config.size)
    out_mask = geometry.map_mask(mask)
    out = geometry.warp(np.where(mask, image, np.float32(0.0)), antialias=config.antialias)
    out = np.where(out_mask, np.clip(out, 0.0, 1.0), np.float32(0.0)).astype(np.float32)
    return Preprocessed(image=out, breast_mask=out_mask, geometry=geometry, breast_side=side)


def as_unit_float(pixels: np.ndarray) -> np.ndarray:
    """2-D float32 in [0, 1]: floats clipped, integers scaled by their dtype's maximum; NaN/inf refused."""
    array = np.asarray(pixels)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"expected a non-empty 2-D image, got shape {array.shape}")
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(array.astype(np.float64) / np.iinfo(array.dtype).max, 0.0, 1.0).astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"expected real pixel values, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError("pixels contain NaN or infinite values")
    return np.clip(array, 0.0, 1.0).astype(np.float32)


def segment_breast(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Step 1: boolean mask of the breast in the original frame (threshold, opening, largest component, fill)."""
    image = as_unit_float(pixels)
    levels = np.rint(image * np.float32(config.levels - 1)).astype(np.int32)
    otsu = otsu_level(np.bincount(levels.ravel(), minlength=config.levels))
    threshold = max(config.threshold_factor * otsu, config.min_threshold * (config.levels - 1))
    foreground = levels > threshold
    foreground = _open(foreground, config.opening_radius * max(foreground.shape))
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return foreground
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes == sizes.max()  # ties kept together: independent of scan order
    keep[0] = False
    return ndimage.binary_fill_holes(keep[labels])


def otsu_level(histogram: np.ndarray) -> float:
    """Otsu's threshold level of a histogram (the last level of the lower class); 0 for an empty histogram.

    Empty bins between two clusters give a plateau of equal between-class variance: its midpoint is returned,
    not its first level, so a clean gap is split in the middle.
    """
    counts = np.asarray(histogram, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    levels = np.arange(counts.size, dtype=np.float64)
    weight_low = np.cumsum(counts) / total
    mean_low = np.cumsum(counts * levels) / total
    mean_all = mean_low[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * weight_low - mean_low) ** 2 / (weight_low * (1.0 - weight_low))
    between[~np.isfinite(between)] = -1.0
    if between.max() < 0:  # a single grey level: everything is one class
        return float(np.flatnonzero(counts)[0])
    best = np.flatnonzero(between == between.max())
    return (float(best[0]) + float(best[-1])) / 2.0


def side_from_mask(mask: np.ndarray) -> str:
    """Step 3 without a known side: the half of the image with more breast pixels ("left" on a tie)."""
    columns = mask.sum(axis=0)
    half = mask.shape[1] // 2
    left = int(columns[:half].sum())
    right = int(columns[mask.shape[1] - half :].sum())
    return "right" if right > left else "left"


def _open(mask: np.ndarray, radius: float) -> np.ndarray:
    """Morphological opening with a square of side 2 * floor(radius) + 1 (separable min/max filters: fast)."""
    side = 2 * int(radius) + 1
    if side < 3 or not mask.any():
        return mask
    eroded = ndimage.minimum_filter(mask.view(np.uint8), size=side, mode="nearest")
    return ndimage.maximum_filter(eroded, size=side, mode="nearest").astype(bool)
