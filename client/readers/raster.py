"""PNG and PGM (binary P5) mammograms -> `DecodedImage`.

PGM is parsed here (the format is a few header tokens and raw samples, Netpbm spec): magic `P5`, width, height,
maxval (1..65535), each token separated by whitespace with `#` comments allowed, then one whitespace byte and
width x height samples, 1 byte each when maxval < 256, else 2 bytes big-endian. Pixels are scaled by maxval, so a
12-bit file (maxval 4095) gives the same [0, 1] range as an 8-bit one; `bits_stored` is maxval's bit length.
The official mini-MIAS files are `P5\\n1024 1024\\n255\\n` + 1024*1024 bytes.

PNG: the chunk list is walked first (IHDR first, every chunk complete, CRCs right, up to IEND) so truncated
and corrupt files get their own reasons; then Pillow decodes 8- and 16-bit grayscale (`bits_stored` 8 / 16,
scaled by 255 / 65535), 1-bit, and palette/RGB/RGBA/LA files whose colour channels are equal (grayscale stored
as colour); real colour is refused.
Raster files carry no laterality or view: those come from the data set's annotations.

Both formats declare their size in a header (PGM width/height/maxval, PNG IHDR); the declared samples are checked
against `max_image_bytes` (`base.check_declared_size`) before anything is allocated, and a PGM header number
longer than `_MAX_HEADER_DIGITS` digits is refused as it is read.
"""

from __future__ import annotations

import io
import re
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from client.readers.base import MAX_IMAGE_BYTES, DecodedImage, UnreadableImage, check_declared_size

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NETPBM_KINDS = {
    b"P1": "plain PBM (P1)",
    b"P2": "plain (ASCII) PGM (P2)",
    b"P3": "plain PPM (P3)",
    b"P4": "binary PBM (P4)",
    b"P6": "colour PPM (P6)",
    b"P7": "PAM (P7)",
}
_PGM_TOKEN = re.compile(rb"\s*((?:#[^\n]*\n\s*)*)([^\s#]+)")
_MAX_HEADER_DIGITS = 9  # up to 999,999,999: far beyond any image, and parsed without a huge int
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel


def read_raster(path: Path, *, max_image_bytes: int = MAX_IMAGE_BYTES) -> DecodedImage:
    """Decode a PNG or binary PGM file; raise `UnreadableImage` with a specific reason otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableImage(f"cannot read file ({exc.strerror or type(exc).__name__})") from exc
    if not data:
        raise UnreadableImage("empty file")
    if data.startswith(PNG_SIGNATURE):
        return _decode_png(data, max_image_bytes)
    if data[:2] == b"P5":
        return _decode_pgm(data, max_image_bytes)
    if data[:2] in _NETPBM_KINDS:
        raise UnreadableImage(f"unsupported Netpbm format: {_NETPBM_KINDS[data[:2]]}; expected binary PGM (P5)")
    raise UnreadableImage("not a PNG or PGM file")


def _decode_pgm(data: bytes, max_image_bytes: int) -> DecodedImage:
    values: list[int] = []
    position = 2
    names = ("width", "height", "maxval")
    for name in names:
        match = _PGM_TOKEN.match(data, position)
        if match is None:
            raise UnreadableImage(f"truncated PGM header: {name} missing")
        token = match.group(2)
        if not token.isdigit():
            raise UnreadableImage(f"corrupt PGM header: {name} is not a positive integer")
        if len(token) > _MAX_HEADER_DIGITS:
            raise UnreadableImage(
                f"corrupt PGM header: {name} has {len(token):,} digits (at most {_MAX_HEADER_DIGITS} accepted)"
            )
        values.append(int(token))
        position = match.end()
    width, height, maxval = values
    if width == 0 or height == 0:
        raise UnreadableImage(f"corrupt PGM header: image size {width}x{height}")
    if not 0 < maxval < 65536:
        raise UnreadableImage(f"corrupt PGM header: maxval {maxval} outside 1..65535")
    check_declared_size("PGM header", {"width": width, "height": height}, 1 if maxval < 256 else 2, max_image_bytes)
    if position >= len(data) or data[position : position + 1] not in (b" ", b"\t", b"\n", b"\r", b"\v", b"\f"):
        raise UnreadableImage("truncated PGM file: no pixel data after the header")
    pixel_bytes = data[position + 1 :]
    sample_size = 1 if maxval < 256 else 2
    expected = width * height * sample_size
    if len(pixel_bytes) < expected:
        raise UnreadableImage(f"truncated PGM file: {len(pixel_bytes)} of {expected} pixel bytes present")
    if len(pixel_bytes) > expected:
        raise UnreadableImage(
            f"corrupt PGM file: {len(pixel_bytes) - expected} bytes after the {width}x{height} pixel data"
        )
    samples = np.frombuffer(pixel_bytes, dtype=np.uint8 if sample_size == 1 else ">u2").reshape(height, width)
    if int(samples.max()) > maxval:
        raise UnreadableImage(f"corrupt PGM file: pixel values above maxval {maxval}")
    pixels = samples.astype(np.float32) / np.float32(maxval)
    return DecodedImage(pixels=pixels, bits_stored=maxval.bit_length(), source_format="pgm")


def _decode_png(data: bytes, max_image_bytes: int) -> DecodedImage:
    _check_png_chunks(data)
    _check_png_size(data, max_image_bytes)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.load()
            return _png_pixels(image)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as exc:
        raise UnreadableImage("PNG image too large (decompression bomb guard)") from exc
    except Exception as exc:  # Pillow raises assorted types on corrupt data; the message names the cause
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        if "truncated" in message.lower() or isinstance(exc, EOFError):
            raise UnreadableImage(f"truncated PNG file ({message})") from None
        raise UnreadableImage(f"corrupt PNG file ({message})") from None


def _check_png_size(data: bytes, max_image_bytes: int) -> None:
    """IHDR (PNG spec 11.2.2): width, height, bit depth, colour type -> declared samples, capped before decoding."""
    ihdr = data[len(PNG_SIGNATURE) + 8 : len(PNG_SIGNATURE) + 21]
    if len(ihdr) < 13:
        raise UnreadableImage("corrupt PNG file: IHDR chunk shorter than 13 bytes")
    width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    bit_depth, colour_type = ihdr[8], ihdr[9]
    samples = _PNG_SAMPLES.get(colour_type, 4)
    check_declared_size("PNG header", {"width": width, "height": height}, samples * max(1, -(-bit_depth // 8)),
                        max_image_bytes)


def _check_png_chunks(data: bytes) -> None:
    """Walk the chunk list (PNG spec §5.3): IHDR first, every chunk complete with a matching CRC, up to IEND.
    Gives truncation and corruption their own reasons before Pillow decodes anything."""
    position, first = len(PNG_SIGNATURE), True
    while True:
        if position + 8 > len(data):
            raise UnreadableImage(f"truncated PNG file: ends at byte {len(data)} before the IEND chunk")
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if not kind.isalpha() or length > 0x7FFFFFFF:
            raise UnreadableImage(f"corrupt PNG file: invalid chunk header at byte {position}")
        name = kind.decode("ascii")
        if first and kind != b"IHDR":
            raise UnreadableImage(f"corrupt PNG file: first chunk is {name}, not IHDR")
        end = position + 12 + length
        if end > len(data):
            raise UnreadableImage(f"truncated PNG file: {name} chunk at byte {position} cut short")
        if zlib.crc32(data[position + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            raise UnreadableImage(f"corrupt PNG file: CRC mismatch in {name} chunk at byte {position}")
        if kind == b"IEND":
            return
        position, first = end, False


def _png_pixels(image: Image.Image) -> DecodedImage:
    mode = image.mode
    if mode == "L":
        array, bits, scale = np.asarray(image), 8, 255.0
    elif mode in ("I;16", "I;16B", "I;16L"):
        array, bits, scale = np.asarray(image), 16, 65535.0
    elif mode == "I":
        array = np.asarray(image)
        if array.min() < 0 or array.max() > 65535:
            raise UnreadableImage("PNG with 32-bit integer pixels outside 0..65535")
        bits, scale = 16, 65535.0
    elif mode == "1":
        array, bits, scale = np.asarray(image.convert("L")), 1, 255.0
    elif mode in ("P", "PA", "RGB", "RGBA", "LA"):
        array, bits, scale = _gray_from_colour(image), 8, 255.0
    else:
        raise UnreadableImage(f"unsupported PNG pixel mode {mode}")
    pixels = array.astype(np.float32) / np.float32(scale)
    return DecodedImage(pixels=pixels, bits_stored=bits, source_format="png")


def _gray_from_colour(image: Image.Image) -> np.ndarray:
    """Grayscale stored as palette or colour: accept only when every pixel has R == G == B (alpha is dropped)."""
    rgb = np.asarray(image.convert("RGB"))
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise UnreadableImage(f"colour PNG ({image.mode}); expected a grayscale image")
    return rgb[..., 0]
