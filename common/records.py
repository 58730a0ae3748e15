"""What the rest of MammoFL knows about one mammogram, independent of the file format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Class order used everywhere (labels, logits, confusion matrices).
CLASS_NAMES: tuple[str, ...] = ("normal", "benign", "malignant")
LABEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}


@dataclass(frozen=True)
class LesionCircle:
    """A lesion annotation in pixel coordinates of the *original* image, origin top-left.

    `x` is the column, `y` the row (0-based), `r` the radius in pixels.
    """

    x: float
    y: float
    r: float


@dataclass(frozen=True)
class ImageRecord:
    """One image of a hospital data set, with its label and the metadata training needs.

    `breast_side` is where the breast lies in the stored pixel array ("left" or "right" half of the
    image), when the source tells it; preprocessing flips every image so the breast lies on the left.
    """

    path: Path
    label: str | None  # one of CLASS_NAMES, or None where the source has no label
    patient_id: str
    laterality: str | None = None  # "L" or "R" (the patient's breast)
    view: str | None = None  # "CC", "MLO", ...
    breast_side: str | None = None  # "left" / "right" in the pixel array, None = find from pixels
    lesions: tuple[LesionCircle, ...] = ()
    roi_mask: Path | None = None
    background_tissue: str | None = None  # mini-MIAS: F / G / D
    abnormalities: tuple[str, ...] = field(default_factory=tuple)  # mini-MIAS classes: CIRC, CALC, ...

    @property
    def label_index(self) -> int:
        if self.label is None:
            raise ValueError(f"{self.path.name}: no label")
        return LABEL_INDEX[self.label]
