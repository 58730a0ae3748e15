"""Repair of one known defect of sequential JPEG frames: a scan header whose spectral selection end is not 63.

ITU-T T.81 B.2.3: in the sequential DCT modes (SOF0 baseline, SOF1 extended, SOF9 arithmetic) a scan must have
Ss = 0 and Se = 63. Some 12-bit JPEG Extended DICOM files (NEMA WG04 MG1_JPLY, RG2_JPLY, written by the
Stanford PVRG codec) carry Se = 0; libjpeg refuses them (error -1038) although the entropy-coded data is
ordinary sequential data. Setting that one byte to 63 makes them decodable and changes nothing else.
"""

from __future__ import annotations

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_SEQUENTIAL_SOF = {0xC0, 0xC1, 0xC9}
_OTHER_SOF = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field


def repair_sequential_scan(frame: bytes) -> bytes | None:
    """A copy of `frame` with Se of its first scan set to 63, or None when there is nothing to repair.

    Only a sequential-mode frame whose first scan header has Ss = 0 and Se != 63 is changed; anything else
    (conformant, progressive, lossless, malformed) gives None and is left to the decoder to judge.
    """
    if frame[:2] != b"\xff" + bytes([_SOI]):
        return None
    sequential = False
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker == _EOI:
            return None
        length = int.from_bytes(frame[pos + 2 : pos + 4], "big")
        if marker in _SEQUENTIAL_SOF:
            sequential = True
        elif marker in _OTHER_SOF:
            return None
        elif marker == _SOS:
            return _repaired_scan(frame, pos, length) if sequential else None
        pos += 2 + length
    return None


def _repaired_scan(frame: bytes, pos: int, length: int) -> bytes | None:
    components = frame[pos + 4] if pos + 4 < len(frame) else 0
    se_at = pos + 4 + 1 + 2 * components + 1  # Ls(2) Ns(1) Ns*(Cs, Td/Ta) Ss Se Ah/Al
    if components == 0 or se_at >= pos + 2 + length or se_at >= len(frame):
        return None
    if frame[se_at - 1] != 0 or frame[se_at] == 63:
        return None
    repaired = bytearray(frame)
    repaired[se_at] = 63
    return bytes(repaired)
