"""Types every reader returns or raises."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
