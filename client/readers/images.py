"""One entry point for any hospital image file: dispatch on the file's content, never on its name.

Order: empty file; DICOM Part 10 (`DICM` at byte 128, PS3.10 §7.1); PNG signature; Netpbm magic (`P1`..`P7`);
a DICOM data set written without preamble (starts with a little-endian group 0002 or 0008 element); other
common image formats (named in the reason); anything else is not an image file.
"""

from __future__ import annotations

from pathlib import Path

from client.readers.base import MAX_IMAGE_BYTES, DecodedImage, UnreadableImage
from client.readers.raster import PNG_SIGNATURE, read_raster

NOT_AN_IMAGE = "not an image file (expected DICOM, PNG or PGM)"
_OTHER_FORMATS = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
)
_VALUE_REPRESENTATIONS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


def read_image(path: Path, *, max_image_bytes: int = MAX_IMAGE_BYTES) -> DecodedImage:
    """Decode a DICOM, PNG or PGM file; raise `UnreadableImage` with a specific reason when that is impossible.

    `max_image_bytes` caps the samples a header may declare (checked before decoding, `base.check_declared_size`).
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except IsADirectoryError as exc:
        raise UnreadableImage("a folder, not a file") from exc
    except OSError as exc:
        raise UnreadableImage(f"cannot read file ({exc.strerror or type(exc).__name__})") from exc
    kind = sniff_format(head)
    if kind == "empty":
        raise UnreadableImage("empty file")
    if kind == "dicom":
        from client.readers.dicom import read_dicom  # pydicom is imported only when a DICOM file is met

        return read_dicom(path, max_image_bytes=max_image_bytes)
    if kind in ("png", "netpbm"):
        return read_raster(path, max_image_bytes=max_image_bytes)
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            raise UnreadableImage(f"unsupported image format {name} (expected DICOM, PNG or PGM)")
    raise UnreadableImage(NOT_AN_IMAGE)


def sniff_format(head: bytes) -> str:
    """Name the format of a file from its first 132 bytes: "empty", "dicom", "png", "netpbm" or "other"."""
    if not head:
        return "empty"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
        return "netpbm"
    if _looks_like_bare_dicom(head):
        return "dicom"
    return "other"


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A data set without the 128-byte preamble: first tag (0002,xxxx) or (0008,xxxx), little endian, with an
    explicit VR or an implicit-VR 32-bit length that is plausible for a header element."""
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    element = int.from_bytes(head[2:4], "little")
    if group not in (0x0002, 0x0008) or element > 0x0FFF:
        return False
    if head[4:6] in _VALUE_REPRESENTATIONS:
        return True
    return int.from_bytes(head[4:8], "little") < 0x10000
