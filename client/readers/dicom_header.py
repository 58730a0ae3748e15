"""The few DICOM header facts MammoFL uses: is it a breast image, which breast, which view, where the breast lies.

Only the attributes in `NEEDED_TAGS` are ever parsed from a file; patient identity (PatientID, names, dates)
is not among them, so it is never read, parsed, kept or logged.

Laterality, first found wins: ImageLaterality (0020,0062) -> Laterality (0020,0060) -> Anatomic Region Sequence
coded as left/right breast -> a token in SeriesDescription / ProtocolName ("L", "RIGHT", "LCC", "R MLO").
PatientOrientation is not used for laterality: its L/R letters depend on how the image was hung.
View, first found wins: ViewPosition (0018,5101) -> View Code Sequence (CID 4014) -> PatientOrientation holding
a view instead of directions (CBIS-DDSM writes "CC" / "MLO" there) -> a token in SeriesDescription / ProtocolName.
Breast side in the array: from the row direction of PatientOrientation (C.7.6.1.1.1): columns running towards
A(nterior) put the chest wall at the left edge ("left"), towards P(osterior) at the right edge ("right").
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

NEEDED_TAGS: tuple[str, ...] = (
    # what the image is
    "SOPClassUID", "Modality", "BodyPartExamined", "AnatomicRegionSequence",
    # which breast, which view, how it lies
    "ImageLaterality", "Laterality", "ViewPosition", "ViewCodeSequence", "PatientOrientation",
    "SeriesDescription", "ProtocolName",
    # pixel description and transforms
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "NumberOfFrames",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence",
    "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
    # pixels
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "FloatPixelData", "DoubleFloatPixelData", "PixelData",
)  # fmt: skip

DIGITAL_MAMMOGRAPHY_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
}

# Anatomic region codes (SNOMED CT and the legacy SNOMED-RT "SRT" values) -> laterality ("" = either breast).
_BREAST_REGION_CODES: dict[str, str] = {
    "76752008": "", "T-04000": "",  # breast
    "80248007": "L", "T-04030": "L",  # left breast
    "73056007": "R", "T-04020": "R",  # right breast
}  # fmt: skip

# CID 4014 "View for Mammography" (SNOMED CT and SRT) -> ACR MQCM abbreviation.
_VIEW_CODES: dict[str, str] = {
    "399162004": "CC", "R-10242": "CC",
    "399368009": "MLO", "R-10226": "MLO",
    "399260004": "ML", "R-10224": "ML",
    "399352003": "LM", "R-10228": "LM",
    "399099002": "LMO", "R-10230": "LMO",
    "399192008": "XCCL", "R-1024A": "XCCL",
    "399101009": "XCCM", "R-1024B": "XCCM",
    "399196006": "FB", "R-10244": "FB",
    "399188001": "SIO", "R-102D0": "SIO",
    "441555000": "ISO", "R-40AAA": "ISO",
}  # fmt: skip

MAMMOGRAPHY_VIEWS = frozenset({*_VIEW_CODES.values(), "AT", "CV", "RL", "RM"})
_LATERALITY_WORDS = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}
_TOKEN = re.compile(r"[A-Z0-9]+")


def breast_image_problem(ds: Dataset) -> str | None:
    """None for a breast image, else the reason it is not one (names Modality and BodyPartExamined).

    Breast = a Digital Mammography SOP class, or Modality MG, or BodyPartExamined BREAST (NEMA's digitised
    film mammograms are Secondary Capture with Modality RG), or an Anatomic Region Sequence coded as breast.
    """
    modality = text_value(ds, "Modality")
    body_part = text_value(ds, "BodyPartExamined")
    if text_value(ds, "SOPClassUID") in DIGITAL_MAMMOGRAPHY_SOP_CLASSES or modality == "MG" or body_part == "BREAST":
        return None
    if any(code in _BREAST_REGION_CODES for code in _codes(ds, "AnatomicRegionSequence")):
        return None
    return f"not a breast image (Modality {printable(modality)}, BodyPartExamined {printable(body_part)})"


def laterality(ds: Dataset) -> str | None:
    """"L" or "R" for the imaged breast, None when the header does not say (order: module docstring)."""
    for keyword in ("ImageLaterality", "Laterality"):
        side = _LATERALITY_WORDS.get(text_value(ds, keyword))
        if side:
            return side
    for code in _codes(ds, "AnatomicRegionSequence"):
        if _BREAST_REGION_CODES.get(code):
            return _BREAST_REGION_CODES[code]
    return _from_descriptions(ds)[0]


def view(ds: Dataset) -> str | None:
    """The mammographic view ("CC", "MLO", ...), None when the header does not say (order: module docstring)."""
    position = text_value(ds, "ViewPosition")
    if position in MAMMOGRAPHY_VIEWS:
        return position
    for code in _codes(ds, "ViewCodeSequence"):
        if code in _VIEW_CODES:
            return _VIEW_CODES[code]
    for value in _values(ds, "PatientOrientation"):
        if value in MAMMOGRAPHY_VIEWS:
            return value
    return _from_descriptions(ds)[1]


def breast_side(ds: Dataset) -> str | None:
    """"left" / "right": where the chest wall and the breast lie in the pixel array, from PatientOrientation."""
    orientation = _values(ds, "PatientOrientation")
    if len(orientation) != 2:
        return None
    row_direction = orientation[0]
    if row_direction.startswith("A"):
        return "left"
    if row_direction.startswith("P"):
        return "right"
    return None


def _from_descriptions(ds: Dataset) -> tuple[str | None, str | None]:
    """(laterality, view) from tokens such as "L", "RIGHT", "CC", "LMLO" in SeriesDescription / ProtocolName."""
    side: str | None = None
    found_view: str | None = None
    for keyword in ("SeriesDescription", "ProtocolName"):
        for token in _TOKEN.findall(text_value(ds, keyword)):
            if token in _LATERALITY_WORDS:
                side = side or _LATERALITY_WORDS[token]
            elif token in MAMMOGRAPHY_VIEWS:
                found_view = found_view or token
            elif token[:1] in ("L", "R") and token[1:] in MAMMOGRAPHY_VIEWS:
                side = side or token[0]
                found_view = found_view or token[1:]
    return side, found_view


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None:
        return []
    items = [value] if isinstance(value, (str, bytes)) else list(value)
    return [str(item).strip().upper() for item in items]


def text_value(ds: Dataset, keyword: str) -> str:
    """An attribute's value(s) as one upper-case string ("" when absent), values joined with "\\"."""
    return "\\".join(_values(ds, keyword))


def _codes(ds: Dataset, keyword: str) -> list[str]:
    sequence = ds.get(keyword) or []
    return [str(item.get("CodeValue", "")).strip() for item in sequence]


def printable(value: str) -> str:
    """A CS value as it may appear in a reason: at most 16 characters of A-Z, 0-9, space, _ and \\."""
    cleaned = re.sub(r"[^A-Z0-9 _\\]", "?", value)[:16]
    return cleaned or "missing"
