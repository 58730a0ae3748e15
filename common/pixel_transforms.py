"""Grayscale pixel transforms of the DICOM standard: stored values -> float32 in [0, 1], bright = dense.

Pure numpy, no file access: each function takes an array and a few header values. The order is the grayscale
part of the pixel transformation sequence (PS3.4 N.2), applied by `to_unit_intensity`:

1. Stored values: `BitsStored` bits, unsigned or two's complement (`PixelRepresentation`, PS3.3 C.7.6.3.1).
   Values outside that range (stray high bits, decoder overshoot) are clipped to it.
2. Modality LUT (PS3.3 C.11.1): the first item of the Modality LUT Sequence if present, else Rescale Slope /
   Intercept (identity when absent). The standard forbids both; if both are present the sequence wins.
3. VOI LUT (PS3.3 C.11.2): the first item of the VOI LUT Sequence if present, else the first Window Center /
   Width pair with its VOI LUT Function (LINEAR C.11.2.1.2.1, LINEAR_EXACT C.11.2.1.3.2, SIGMOID C.11.2.1.3.1).
   Where both are present the sequence wins (as pydicom does). Neither: identity.
4. Scaling to [0, 1] over the output range of the last step applied: a window maps to [0, 1] directly; a LUT
   has the range [0, 2**bits - 1] of its entries (C.11.1.1.1, C.11.2.1.1); without LUT or window, the
   modality transform of the full stored range (so the scale depends on the header only, never on the image).
5. MONOCHROME1 (minimum value shown white, PS3.3 C.7.6.3.1.2) is inverted, as its Presentation LUT Shape
   INVERSE prescribes (PS3.3 C.11.6), so that in the output high values are bright, i.e. dense tissue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PHOTOMETRIC_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass(frozen=True, eq=False)
class LookupTable:
    """A Modality or VOI LUT: `data[0]` is the output for input `first_mapped`; entries are `bits` wide."""

    first_mapped: int
    data: np.ndarray
    bits: int

    @classmethod
    def from_descriptor(
        cls, descriptor: Sequence[int], data: Sequence[int] | np.ndarray, *, signed_input: bool = False
    ) -> LookupTable:
        """Build from LUT Descriptor (entries, first mapped value, bits; C.11.1.1.1) and LUT Data.

        0 entries means 2**16. The first mapped value has the input's signedness: a descriptor read as US for
        signed input (or as SS for unsigned input) is reinterpreted. Extra data entries (padding) are dropped.
        """
        if len(descriptor) != 3:
            raise ValueError(f"LUT Descriptor needs 3 values, got {len(descriptor)}")
        entries, first, bits = (int(v) for v in descriptor)
        entries = entries or 2**16
        if signed_input and first >= 2**15:
            first -= 2**16
        elif not signed_input and first < 0:
            first += 2**16
        values = np.asarray(data)
        if values.ndim != 1 or values.size < entries:
            raise ValueError(f"LUT Data has {values.size} entries, the descriptor says {entries}")
        values = values[:entries].astype(np.int64)
        if values.min() < 0:
            raise ValueError("LUT Data entries must be unsigned")
        # Some writers declare 16 bits for 12-bit data, others the reverse: widen to what the data needs.
        bits = max(bits, int(values.max()).bit_length())
        if not 8 <= bits <= 16:
            raise ValueError(f"LUT entries of {bits} bits (8-16 expected)")
        return cls(first_mapped=first, data=values, bits=bits)

    @property
    def output_range(self) -> tuple[int, int]:
        return 0, 2**self.bits - 1


@dataclass(frozen=True)
class PixelHeader:
    """The header values the transforms need, nothing else."""

    photometric: str
    bits_stored: int
    signed: bool = False
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    modality_lut: LookupTable | None = None
    voi_lut: LookupTable | None = None
    window_center: float | None = None
    window_width: float | None = None
    voi_function: str = "LINEAR"

    def __post_init__(self) -> None:
        if self.photometric not in PHOTOMETRIC_GRAYSCALE:
            raise ValueError(f"not a grayscale image (PhotometricInterpretation {self.photometric})")
        if not 1 <= self.bits_stored <= 16:
            raise ValueError(f"BitsStored {self.bits_stored} (1-16 supported)")
        if self.rescale_slope == 0:
            raise ValueError("RescaleSlope 0")
        if (self.window_center is None) != (self.window_width is None):
            raise ValueError("a window needs both center and width")
        if self.voi_function not in VOI_FUNCTIONS:
            raise ValueError(f"VOILUTFunction {self.voi_function} (one of {', '.join(VOI_FUNCTIONS)} expected)")
        if self.window_width is not None:
            _check_width(self.window_width, self.voi_function)


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The values `bits_stored` bits can hold, unsigned or two's complement."""
    if signed:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


def rescale(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Rescale Slope / Intercept (C.11.1.1.2): `slope * values + intercept`, float64."""
    return np.asarray(values, dtype=np.float64) * slope + intercept


def apply_lut(values: np.ndarray, lut: LookupTable) -> np.ndarray:
    """Map values through a LUT; inputs below the first mapped value get the first entry, above the last the last."""
    index = np.rint(np.asarray(values, dtype=np.float64)) - lut.first_mapped
    np.clip(index, 0, lut.data.size - 1, out=index)
    return lut.data[index.astype(np.intp)]


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Window Center / Width with its VOI LUT Function, output in [0, 1] (float64).

    LINEAR (C.11.2.1.2.1): 0 for x <= c - 0.5 - (w-1)/2, 1 for x > c - 0.5 + (w-1)/2, else
    ((x - (c - 0.5)) / (w - 1) + 0.5); width 1 is a step at c - 0.5. LINEAR_EXACT (C.11.2.1.3.2):
    (x - c) / w + 0.5 clipped. SIGMOID (C.11.2.1.3.1): 1 / (1 + exp(-4 (x - c) / w)).
    """
    _check_width(width, function)
    x = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
        if width == 0:
            return (x > center).astype(np.float64)
    out = (x - center) / width + 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def scale_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] onto [0, 1], clipped, float32."""
    if not high > low:
        raise ValueError(f"empty range [{low}, {high}]")
    out = (np.asarray(values, dtype=np.float64) - low) / (high - low)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32)


def invert_monochrome1(unit: np.ndarray) -> np.ndarray:
    """MONOCHROME1 -> MONOCHROME2 on values in [0, 1]: `1 - unit`."""
    return (1.0 - np.asarray(unit, dtype=np.float32)).astype(np.float32)


def to_unit_intensity(stored: np.ndarray, header: PixelHeader) -> np.ndarray:
    """Stored values -> float32 in [0, 1], bright = dense, in the order of the module docstring."""
    low, high = stored_range(header.bits_stored, header.signed)
    values = np.clip(stored, low, high)
    if header.modality_lut is not None:
        values = apply_lut(values, header.modality_lut)
        modality_range = header.modality_lut.output_range
    else:
        if (header.rescale_slope, header.rescale_intercept) != (1.0, 0.0):
            values = rescale(values, header.rescale_slope, header.rescale_intercept)
        ends = rescale(np.array([low, high]), header.rescale_slope, header.rescale_intercept)
        modality_range = (float(ends.min()), float(ends.max()))
    if header.voi_lut is not None:
        unit = scale_to_unit(apply_lut(values, header.voi_lut), *header.voi_lut.output_range)
    elif header.window_center is not None and header.window_width is not None:
        unit = apply_window(values, header.window_center, header.window_width, header.voi_function)
        unit = unit.astype(np.float32)
    else:
        unit = scale_to_unit(values, *modality_range)
    if header.photometric == "MONOCHROME1":
        unit = invert_monochrome1(unit)
    return unit


def _check_width(width: float, function: str) -> None:
    if function == "LINEAR" and width < 1:
        raise ValueError(f"WindowWidth {width} (>= 1 required for LINEAR)")
    if width <= 0:
        raise ValueError(f"WindowWidth {width} (> 0 required for {function})")
