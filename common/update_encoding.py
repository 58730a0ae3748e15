"""How a hospital's trained weights travel to the coordinator: float32, or a smaller encoding of the update.

Pure numpy (no flwr): the client encodes, the coordinator decodes before it validates or aggregates, both with
the global model of the round as the reference.

Encodings (run config ``update-encoding``):

- ``float32``: the weights themselves, unchanged (4 bytes per parameter). Decoding is the identity.
- ``float16``: the update ``weights - reference`` in IEEE half precision (2 bytes per parameter). Encoding the
  difference, not the weights, keeps the rounding error relative to the size of the update (about 2**-11 of each
  element's magnitude) instead of to the size of the weights; updates beyond float16's range (65504) are refused.
- ``int8``: the update, per array, linearly quantised to 255 symmetric levels (1 byte per parameter plus one
  float32 scale per array, stored under ``<key>`` + :data:`SCALE_SUFFIX`): ``q = round(d / s)`` with
  ``s = max|d| / 127``, decoded as ``q * s``; the error of each element is at most ``s / 2`` (round to nearest).

Arrays that are not floating point (e.g. integer counters) always travel unchanged. Decoding returns arrays of
the reference's dtype, under the reference's keys; an encoded update that does not fit the reference (keys,
shapes, dtypes) raises :class:`UpdateEncodingError` naming the array.

Privacy: with local DP the node's weights are already noised when they are encoded, so encoding is
post-processing of a DP release and costs no privacy. Distributed DP (SecAgg+) quantises the noised gradient sum
itself; this encoding does not apply there (the run config refuses it).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

ENCODINGS = ("float32", "float16", "int8")
#: Key suffix of an int8 array's float32 scale.
SCALE_SUFFIX = "::int8-scale"
_INT8_LEVELS = 127
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class UpdateEncodingError(ValueError):
    """An update that cannot be encoded or decoded as asked; the message names the array."""


def encode_update(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                  encoding: str) -> dict[str, np.ndarray]:
    """`weights` as they travel under `encoding`, relative to the round's global model `reference`."""
    _check_encoding(encoding)
    if encoding == "float32":
        return {k: np.asarray(v) for k, v in weights.items()}
    out: dict[str, np.ndarray] = {}
    for key, value in weights.items():
        value = np.asarray(value)
        if value.dtype.kind != "f":
            out[key] = value
            continue
        delta = value.astype(np.float64) - _reference(reference, key, value).astype(np.float64)
        if not np.all(np.isfinite(delta)):
            raise UpdateEncodingError(f"update '{key}' holds NaN or Inf")
        if encoding == "float16":
            if delta.size and float(np.max(np.abs(delta))) > _FLOAT16_MAX:
                raise UpdateEncodingError(f"update '{key}' exceeds the float16 range ({_FLOAT16_MAX:g})")
            out[key] = delta.astype(np.float16)
        else:
            scale = float(np.max(np.abs(delta))) / _INT8_LEVELS if delta.size else 0.0
            quantised = np.zeros(delta.shape) if scale == 0.0 else np.rint(delta / scale)
            out[key] = np.clip(quantised, -_INT8_LEVELS, _INT8_LEVELS).astype(np.int8)
            out[key + SCALE_SUFFIX] = np.array([scale], dtype=np.float32)
    return out


def decode_update(encoded: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                  encoding: str) -> dict[str, np.ndarray]:
    """The weights `encoded` stands for (reference's keys and dtypes); UpdateEncodingError if it does not fit."""
    _check_encoding(encoding)
    if encoding == "float32":
        return {k: np.asarray(v) for k, v in encoded.items()}
    expected = {k for k, v in reference.items() if np.asarray(v).dtype.kind == "f"}
    scales = {k[:-len(SCALE_SUFFIX)] for k in encoded if k.endswith(SCALE_SUFFIX)}
    if encoding == "int8" and scales != expected:
        raise UpdateEncodingError(f"int8 update: scales for {sorted(scales ^ expected)[:5]} missing or unexpected")
    if encoding == "float16" and scales:
        raise UpdateEncodingError(f"float16 update carries int8 scales ({sorted(scales)[:5]})")
    out: dict[str, np.ndarray] = {}
    for key, value in encoded.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        value = np.asarray(value)
        if key not in expected:
            out[key] = value  # a non-float array, or a key the coordinator's own checks will reject
            continue
        ref = np.asarray(reference[key])
        wanted = np.float16 if encoding == "float16" else np.int8
        if value.dtype != wanted or value.shape != ref.shape:
            raise UpdateEncodingError(f"{encoding} update '{key}' is {value.dtype}{list(value.shape)}, expected "
                                      f"{np.dtype(wanted)}{list(ref.shape)}")
        if encoding == "float16":
            delta = value.astype(np.float64)
        else:
            scale = np.asarray(encoded[key + SCALE_SUFFIX])
            if scale.shape != (1,) or scale.dtype != np.float32 or not (np.isfinite(scale[0]) and scale[0] >= 0):
                raise UpdateEncodingError(f"int8 update '{key}': its scale must be one finite, non-negative "
                                          f"float32, got {scale.dtype}{list(scale.shape)}")
            delta = value.astype(np.float64) * float(scale[0])
        out[key] = (ref.astype(np.float64) + delta).astype(ref.dtype)
    return out


def encoded_nbytes(encoded: Mapping[str, np.ndarray]) -> int:
    """Bytes of the arrays' data alone (no keys, shapes or framing)."""
    return int(sum(np.asarray(v).nbytes for v in encoded.values()))


def _reference(reference: Mapping[str, np.ndarray], key: str, value: np.ndarray) -> np.ndarray:
    if key not in reference:
        raise UpdateEncodingError(f"update '{key}' has no counterpart in the global model")
    ref = np.asarray(reference[key])
    if ref.shape != value.shape:
        raise UpdateEncodingError(f"update '{key}' is {list(value.shape)}, the global model's {list(ref.shape)}")
    return ref


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise UpdateEncodingError(f"unknown update encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")


__all__ = ["ENCODINGS", "SCALE_SUFFIX", "UpdateEncodingError", "decode_update", "encode_update", "encoded_nbytes"]
