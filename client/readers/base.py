"""Types every reader returns or raises, and the guards every reader applies.

Guards (each gives an `UnreadableImage` reason, never a crash):
- declared size: a file whose header declares more than `max_image_bytes` of samples (rows x columns x frames x
  bytes per sample) is refused before anything is decoded or allocated (`MAX_IMAGE_BYTES` by default);
- finite pixels: NaN or infinite values (e.g. from a NaN window or rescale value) are refused;
- decoder panics: Rust decoders (pylibjpeg-rle, built with PyO3) report a bug as `pyo3_runtime.PanicException`,
  a `BaseException` that `except Exception` does not catch; `is_decoder_panic` recognises it by its type so
  that KeyboardInterrupt and SystemExit still pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Default cap on the samples a header may declare: 128 MiB (a 16-bit 8192 x 8192 image; full-field digital
#: mammograms are 20-60 MB). Decoded float32 pixels take up to 4x this.
MAX_IMAGE_BYTES = 128 * 2**20

_PANIC_TYPE = ("pyo3_runtime", "PanicException")


class UnreadableImage(Exception):
    """A file that cannot be used, with a specific, human-readable reason (no pixel data, no PHI)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """Pixels ready for preprocessing plus the few header facts MammoFL keeps.

    `pixels` is float32, 2-D, in [0, 1], with "bright = dense tissue" (MONOCHROME1 already inverted,
    modality and VOI LUT / window already applied). Nothing else of the file's header is kept.
    """

    pixels: np.ndarray
    bits_stored: int
    laterality: str | None = None  # "L" / "R"
    view: str | None = None  # "CC", "MLO", ...
    breast_side: str | None = None  # "left" / "right" in the array, when the header tells it
    source_format: str = ""  # "dicom", "png", "pgm"


def is_decoder_panic(error: BaseException) -> bool:
    """True for a PyO3 `PanicException` (a Rust decoder's bug surfaced as a `BaseException`).

    PyO3 creates that class in each extension module that uses it, so it is matched by module and name."""
    kind = type(error)
    return (kind.__module__, kind.__name__) == _PANIC_TYPE


def check_declared_size(what: str, dimensions: dict[str, int], bytes_per_sample: int, max_image_bytes: int) -> None:
    """Refuse an image whose header declares more than `max_image_bytes` of samples, before any allocation.

    `dimensions` maps header field names to their values (e.g. {"Rows": 4096, "Columns": 3328}); the reason
    names them."""
    total = bytes_per_sample
    for value in dimensions.values():
        total *= max(int(value), 0)
    if total > max_image_bytes:
        shown = " x ".join(f"{name} {value}" for name, value in dimensions.items())
        raise UnreadableImage(
            f"{what} declares {shown} at {bytes_per_sample} byte(s) per sample = {total:,} bytes, "
            f"over the {max_image_bytes:,}-byte limit (refused before decoding)"
        )


def require_finite(pixels: np.ndarray, what: str) -> np.ndarray:
    """`pixels`, or `UnreadableImage` when any value is NaN or infinite (counted, never shown)."""
    finite = np.isfinite(pixels)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise UnreadableImage(f"{what}: {bad:,} of {finite.size:,} pixel values are NaN or infinite")
    return pixels
