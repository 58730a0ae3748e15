"""The image size a compressed DICOM frame declares in its own header, read before any decoder allocates for it.

A decoder sizes its output from the codestream, not from the DICOM header: a frame claiming 65535 x 65535 inside
a 10 x 10 image would be allocated in full. The reader compares this size with Rows x Columns first.
- JPEG (ITU-T T.81 B.2.2, also JPEG-LS T.87): the first SOFn segment holds Y (lines) and X (samples per line).
- JPEG 2000 (T.800 A.5.1): the SIZ segment right after SOC holds Xsiz, Ysiz, XOsiz, YOsiz; the image is
  (Ysiz - YOsiz) x (Xsiz - XOsiz). A JP2 file wrapper is looked through to its codestream.
"""

from __future__ import annotations

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field
_J2K_START = b"\xff\x4f\xff\x51"  # SOC then SIZ
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) declared by a JPEG or JPEG 2000 frame; None when the frame is neither or does not say."""
    if frame.startswith(b"\xff\xd8"):
        return _jpeg_size(frame)
    if frame.startswith(_J2K_START):
        return _j2k_size(frame, 0)
    if frame.startswith(_JP2_SIGNATURE):
        start = frame.find(_J2K_START)
        return _j2k_size(frame, start) if start >= 0 else None
    return None


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 4 <= len(frame):
        if frame[position] != 0xFF:
            return None
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        if marker in _SOF_MARKERS:
            if position + 9 > len(frame):
                return None
            lines = int.from_bytes(frame[position + 5 : position + 7], "big")
            samples = int.from_bytes(frame[position + 7 : position + 9], "big")
            return (lines, samples) if lines else None  # 0 lines: given later by a DNL segment
        if marker in (0xD9, 0xDA):  # EOI or SOS before any frame header
            return None
        position += 2 + int.from_bytes(frame[position + 2 : position + 4], "big")
    return None


def _j2k_size(frame: bytes, start: int) -> tuple[int, int] | None:
    siz = start + 4  # Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4)
    if siz + 20 > len(frame):
        return None
    x_size, y_size, x_offset, y_offset = (
        int.from_bytes(frame[siz + 4 + 4 * i : siz + 8 + 4 * i], "big") for i in range(4)
    )
    return max(y_size - y_offset, 0), max(x_size - x_offset, 0)
