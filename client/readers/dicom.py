"""DICOM mammogram -> `DecodedImage`, or `UnreadableImage` with a specific reason.

Steps: read the bytes; parse only `NEEDED_TAGS` (pydicom); refuse truncated or corrupt files, files without pixel
data and images that are not breast images; check the pixel description (grayscale, one frame, 8 or 16 bits
allocated, Rows x Columns x NumberOfFrames x bytes per sample within `max_image_bytes`, a compressed frame's own
declared size equal to the header's, finite rescale and window values); decode (pydicom with the pylibjpeg plugins: RLE, JPEG 2000, JPEG baseline / extended / lossless);
turn stored values into [0, 1] with `common.pixel_transforms` and refuse non-finite results; keep laterality, view
and breast side. A decoder that panics (`base.is_decoder_panic`) gives a reason like any other decoder error.

Sequential JPEG frames whose scan header has Se != 63 (non-conformant, refused by every common decoder) are
repaired in a copy and decoded with pylibjpeg-libjpeg (see `jpeg_sos`). Multi-frame images (e.g. breast
tomosynthesis) are refused: the models take one 2-D mammogram per file. A file without the 128-byte preamble
and "DICM" marker (PS3.10 7.1) is read as a bare data set (uncompressed, encoding detected) when it starts with a
group 0002 or 0008 tag, else refused as not DICOM.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit

from client.readers import dicom_header
from client.readers.base import (
    MAX_IMAGE_BYTES,
    DecodedImage,
    UnreadableImage,
    check_declared_size,
    is_decoder_panic,
    require_finite,
)
from client.readers.codestream_size import codestream_size
from client.readers.jpeg_sos import repair_sequential_scan
from common.pixel_transforms import LookupTable, PixelHeader, to_unit_intensity

logger = logging.getLogger(__name__)

_PREAMBLE = 128
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF


def read_dicom(path: Path, *, max_image_bytes: int = MAX_IMAGE_BYTES) -> DecodedImage:
    """Read one DICOM mammogram; raise `UnreadableImage(reason)` for anything that cannot be used.

    `max_image_bytes` caps what the header may declare (see `base.check_declared_size`)."""
    data = _read_bytes(Path(path))
    try:
        ds = _parse(data)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # pydicom's value and decoder warnings; refusals carry the reasons
            return _decoded(ds, max_image_bytes)
    except UnreadableImage:
        raise
    except Exception as error:  # pydicom converts raw values lazily: any access may meet a corrupt one
        logger.debug("DICOM file refused on %s", type(error).__name__)
        raise UnreadableImage(f"corrupt DICOM data ({type(error).__name__})") from None


def _decoded(ds: Dataset, max_image_bytes: int) -> DecodedImage:
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnreadableImage("floating-point pixel data (parametric map), not a mammogram")
    if "PixelData" not in ds:
        raise UnreadableImage("no pixel data (not an image object, or a file cut short before its pixel data)")
    try:
        facts = _header_facts(ds, max_image_bytes)
    except UnreadableImage:
        raise
    except Exception as error:  # a corrupt value of a needed attribute (wrong length, wrong multiplicity)
        raise UnreadableImage(f"unreadable header value ({type(error).__name__})") from None
    stored = _decode(ds, facts.shape)
    if stored.shape != facts.shape:
        raise UnreadableImage(f"decoded pixels are {stored.shape}, the header says {facts.shape}")
    try:
        pixels = to_unit_intensity(stored, facts.header)
    except (ValueError, TypeError, OverflowError) as error:
        raise UnreadableImage(f"unusable pixel transform in header: {error}") from None
    return DecodedImage(
        pixels=require_finite(pixels, "pixel values after the modality and VOI transforms"),
        bits_stored=facts.header.bits_stored,
        laterality=facts.laterality,
        view=facts.view,
        breast_side=facts.breast_side,
        source_format="dicom",
    )


@dataclass(frozen=True)
class _HeaderFacts:
    shape: tuple[int, int]
    header: PixelHeader
    laterality: str | None
    view: str | None
    breast_side: str | None


def _header_facts(ds: Dataset, max_image_bytes: int) -> _HeaderFacts:
    problem = dicom_header.breast_image_problem(ds)
    if problem:
        raise UnreadableImage(problem)
    return _HeaderFacts(
        shape=_check_geometry(ds, max_image_bytes),
        header=_pixel_header(ds),
        laterality=dicom_header.laterality(ds),
        view=dicom_header.view(ds),
        breast_side=dicom_header.breast_side(ds),
    )


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UnreadableImage(f"cannot read file ({error.strerror or type(error).__name__})") from None
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    if len(data) < _PREAMBLE + 4:
        raise UnreadableImage(f"too short for a DICOM file ({len(data)} bytes)")
    if data[_PREAMBLE : _PREAMBLE + 4] != b"DICM" and not _is_bare_dataset(data):
        raise UnreadableImage("not a DICOM file (no 'DICM' marker after the 128-byte preamble)")
    return data


def _is_bare_dataset(data: bytes) -> bool:
    """A data set written without preamble and file meta: it starts with a group 0002 or 0008 tag (little endian)."""
    return data[:2] in (b"\x02\x00", b"\x08\x00") and int.from_bytes(data[2:4], "little") <= 0x0FFF


def _parse(data: bytes) -> Dataset:
    """Parse the needed tags from in-memory bytes (so no file name reaches pydicom's messages).

    pydicom tolerates truncation silently (it stops, or drops the unfinished element); a file that ends
    inside a data element is caught here from how the reads went.
    """
    buffer = _WatchedBuffer(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(buffer, force=_is_bare_dataset(data), specific_tags=list(dicom_header.NEEDED_TAGS))
        except Exception as error:  # pydicom raises assorted types on corrupt headers
            if buffer.ran_out:
                raise UnreadableImage(_TRUNCATED) from None
            what = "file meta information" if isinstance(error, InvalidDicomError) else "header"
            raise UnreadableImage(f"corrupt DICOM {what} ({type(error).__name__})") from None
    if any("End of file reached" in str(warning.message) for warning in caught):
        raise UnreadableImage(_UNFINISHED)
    truncated = _truncated_last_element(ds)
    if truncated:
        raise UnreadableImage(truncated)
    if buffer.partial_read or buffer.tell() > len(data):
        raise UnreadableImage(_TRUNCATED)
    if len(ds) == 0:
        raise UnreadableImage("truncated or corrupt file: no data element could be read")
    return ds


_UNFINISHED = "truncated file: it ends before the end of an element of undefined length (compressed pixel data?)"
_TRUNCATED = "truncated or corrupt file: a data element runs past the end of the file"


class _WatchedBuffer(io.BytesIO):
    """BytesIO that remembers reads that got fewer bytes than asked for."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.partial_read = False  # 0 < got < asked: a file never ends like that
        self.ran_out = False  # got < asked, including nothing at all

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        if size is not None and size > 0 and len(chunk) < size:
            self.ran_out = True
            self.partial_read = self.partial_read or len(chunk) > 0
        return chunk


def _truncated_last_element(ds: Dataset) -> str | None:
    """A reason when the last element read has a shorter value than its declared length."""
    if len(ds) == 0:
        return None
    tag = max(ds.keys())
    element = ds.get_item(tag)
    if not isinstance(element, RawDataElement) or element.length == _UNDEFINED_LENGTH or element.value is None:
        return None
    if len(element.value) >= element.length:
        return None
    what = "pixel data" if tag == _PIXEL_DATA else f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"truncated file: {what} has {len(element.value)} of {element.length} bytes"


def _check_geometry(ds: Dataset, max_image_bytes: int) -> tuple[int, int]:
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    allocated = int(ds.get("BitsAllocated") or 0)
    dimensions = {"Rows": rows, "Columns": columns, "NumberOfFrames": frames}
    check_declared_size("header", dimensions, max(1, -(-allocated // 8)), max_image_bytes)
    photometric = dicom_header.text_value(ds, "PhotometricInterpretation")
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        shown = dicom_header.printable(photometric)
        raise UnreadableImage(f"not a grayscale image (PhotometricInterpretation {shown})")
    if frames != 1:
        raise UnreadableImage(f"multi-frame image ({frames} frames, e.g. tomosynthesis): one 2-D mammogram per file")
    if rows <= 0 or columns <= 0:
        raise UnreadableImage("Rows / Columns missing or zero")
    if allocated not in (8, 16):
        raise UnreadableImage(f"BitsAllocated {allocated} (8 or 16 supported)")
    stored = int(ds.get("BitsStored") or 0)
    if not 1 <= stored <= allocated:
        raise UnreadableImage(f"BitsStored {stored} with BitsAllocated {allocated}")
    return rows, columns


def _pixel_header(ds: Dataset) -> PixelHeader:
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    try:
        window_center, window_width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        if window_center is None or window_width is None:
            window_center = window_width = None
        for keyword, value in (("WindowCenter", window_center), ("WindowWidth", window_width)):
            _require_finite_value(keyword, value)
        slope = _require_finite_value("RescaleSlope", _first(ds.get("RescaleSlope")))
        intercept = _require_finite_value("RescaleIntercept", _first(ds.get("RescaleIntercept")))
        return PixelHeader(
            photometric=str(ds.PhotometricInterpretation).strip().upper(),
            bits_stored=int(ds.BitsStored),
            signed=signed,
            rescale_slope=1.0 if slope is None else slope,
            rescale_intercept=0.0 if intercept is None else intercept,
            modality_lut=_lookup_table(ds, "ModalityLUTSequence", signed_input=signed),
            voi_lut=_lookup_table(ds, "VOILUTSequence", signed_input=signed),
            window_center=window_center,
            window_width=window_width,
            voi_function=str(ds.get("VOILUTFunction") or "LINEAR").strip().upper(),
        )
    except (ValueError, TypeError) as error:
        raise UnreadableImage(f"unusable pixel transform in header: {error}") from None


def _require_finite_value(keyword: str, value: float | None) -> float | None:
    """`value` unless it is NaN or infinite (such a value would make every pixel NaN)."""
    if value is not None and not math.isfinite(value):
        raise UnreadableImage(f"{keyword} is {value} (a finite number is required)")
    return value


def _first(value: object) -> float | None:
    """First value of a DS element that may be multi-valued (C.11.2.1.2: the first pair is the default)."""
    if value is None or value == "":
        return None
    if isinstance(value, (str, bytes, int, float)):
        return float(value)
    values = list(value)  # MultiValue
    return float(values[0]) if values else None


def _lookup_table(ds: Dataset, keyword: str, *, signed_input: bool) -> LookupTable | None:
    sequence = ds.get(keyword)
    if not sequence:
        return None
    item = sequence[0]
    if "LUTDescriptor" not in item or "LUTData" not in item:
        raise ValueError(f"{keyword} item without LUT Descriptor or LUT Data")
    descriptor = [int(v) for v in item.LUTDescriptor]
    raw = item.LUTData
    if isinstance(raw, bytes):  # OW: 16-bit words, or bytes when the entries are 8 bits
        entries = descriptor[0] or 2**16
        if descriptor[2] == 8 and len(raw) in (entries, entries + 1):
            data = np.frombuffer(raw, dtype=np.uint8)
        else:
            little_endian = ds.original_encoding[1] is not False
            data = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<u2" if little_endian else ">u2")
    else:
        data = np.asarray([raw] if isinstance(raw, int) else list(raw))
    return LookupTable.from_descriptor(descriptor, data, signed_input=signed_input)


def _decode(ds: Dataset, shape: tuple[int, int]) -> np.ndarray:
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if not syntax:  # a bare data set: native pixel data in the encoding the parser found
        implicit, little_endian = ds.original_encoding
        if not little_endian or implicit is None:
            raise UnreadableImage("no Transfer Syntax UID and no recognisable encoding")
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = syntax
    name = syntax.name
    try:
        if syntax.is_encapsulated:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            _check_codestream_size(frame, shape, name)
        if syntax in (JPEGBaseline8Bit, JPEGExtended12Bit):
            repaired = repair_sequential_scan(frame)
            if repaired is not None:
                logger.debug("decoding a JPEG frame with a repaired scan header (Se -> 63)")
                return _as_stored(_decode_jpeg(repaired), ds)
        return ds.pixel_array
    except UnreadableImage:
        raise
    except Exception as error:  # decoders raise assorted types; the message names the decoder and the cause
        message = " ".join(str(error).split())[:200] or type(error).__name__
        raise UnreadableImage(f"pixel data could not be decoded ({name}): {message}") from None
    except BaseException as error:
        if not is_decoder_panic(error):
            raise  # KeyboardInterrupt, SystemExit
        message = " ".join(str(error).split())[:200]
        raise UnreadableImage(f"pixel data could not be decoded ({name}): decoder panic ({message})") from None


def _check_codestream_size(frame: bytes, shape: tuple[int, int], name: str) -> None:
    """A JPEG / JPEG 2000 frame declares its own size, which the decoder allocates: it must be the header's."""
    declared = codestream_size(frame)
    if declared is not None and declared != shape:
        raise UnreadableImage(
            f"compressed frame ({name}) declares {declared[0]}x{declared[1]} pixels, the header says "
            f"{shape[0]}x{shape[1]} (refused before decoding)"
        )


def _as_stored(decoded: np.ndarray, ds: Dataset) -> np.ndarray:
    """libjpeg returns unsigned samples; signed pixel data is two's complement in BitsStored bits."""
    if int(ds.get("PixelRepresentation") or 0) != 1:
        return decoded
    bits = int(ds.BitsStored)
    values = decoded.astype(np.int32)
    values[values >= 2 ** (bits - 1)] -= 2**bits
    return values


def _decode_jpeg(frame: bytes) -> np.ndarray:
    try:
        from libjpeg import decode  # pylibjpeg-libjpeg, a pinned dependency
    except ImportError:
        raise UnreadableImage("non-conformant JPEG needs pylibjpeg-libjpeg, which is not installed") from None
    return decode(frame)
