"""The released model bundle: weights + model config + preprocessing config + class names, in one file.

Loadable without Flower (``load_bundle(path, trusted=keys) -> (model, meta)``), e.g. by a hospital screening images with a
released model. File format: a ``torch.save`` archive of plain tensors and one JSON string, read back with
``torch.load(weights_only=True)`` (no pickle code runs on load)::

    {"format": "mammofl-bundle/1", "meta": "<JSON: model_config, preprocess_config, preprocess_fingerprint,
     class_names, info>", "weights": {state_dict key: tensor}}

``preprocess_fingerprint`` (``PreprocessConfig.fingerprint``: algorithm version + settings) must match this
version's preprocessing, else the bundle is refused: the model would see pixels unlike those it was trained on.
``info["operating_point"]`` (``common.operating_point.OperatingPoint.to_json``) is the malignancy threshold the
model is used at, chosen on validation data.

Signed: the coordinator signs each released bundle (``common.signing``: ``<bundle>.sig`` beside it, Ed25519 over
the file's bytes and its provenance). :func:`load_bundle` and :func:`read_bundle` take the trusted public keys and
refuse an unsigned file, a file changed after signing, an edited signature or one from another key
(:class:`BundleError` naming the file and what failed), before the file is parsed.

``weights`` is what the federation exchanges (common.weights): trainable parameters and buffers under the plain
model's state-dict keys; frozen pretrained layers come from ``build_model`` (their weights ship with the installed
package).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.models import ModelConfig, build_model
from common.operating_point import OperatingPoint
from common.preprocessing import PreprocessConfig
from common.records import CLASS_NAMES
from common.signing import Provenance, SignatureError, TrustedKeys, verify_file
from common.weights import WeightsError, load_weights

FORMAT = "mammofl-bundle/1"


class BundleError(ValueError):
    """A file that is not a usable MammoFL bundle (why is in the message)."""


@dataclass(frozen=True)
class BundleMeta:
    """Everything needed to use the model the way it was trained."""

    model_config: ModelConfig
    preprocess_config: PreprocessConfig
    class_names: tuple[str, ...] = CLASS_NAMES
    info: dict[str, Any] = field(default_factory=dict)  # provenance: run, round, metrics, operating point, versions
    provenance: Provenance | None = None  # the verified signature's provenance (set on load, never saved)

    @property
    def operating_point(self) -> OperatingPoint | None:
        """The malignancy threshold chosen on validation data, None for a bundle made without one."""
        data = self.info.get("operating_point")
        return OperatingPoint.from_json(data) if data else None


def save_bundle(path: Path, weights: dict[str, Any], meta: BundleMeta, *,
                sign: Callable[[Path, bytes], Path] | None = None) -> Path:
    """Write a bundle atomically; `weights` maps state-dict keys to tensors or numpy arrays.

    `sign(path, data)` (e.g. ``common.signing.Signer.for_file``) writes the signature of the bundle's bytes before
    the bundle takes its final name, so a bundle under its final name always has its signature beside it.
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "meta": json.dumps({
            "model_config": dataclasses.asdict(meta.model_config),
            "preprocess_config": dataclasses.asdict(meta.preprocess_config),
            "preprocess_fingerprint": meta.preprocess_config.fingerprint(),
            "class_names": list(meta.class_names),
            "info": meta.info,
        }),
        "weights": {k: _tensor(v) for k, v in weights.items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if sign is not None:
            sign(path, data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def read_bundle(path: Path, *, trusted: TrustedKeys) -> tuple[dict[str, torch.Tensor], BundleMeta]:
    """The weights and metadata of a bundle signed by one of the `trusted` keys, without building the model."""
    try:
        verified = verify_file(path, trusted, kind="bundle")
    except SignatureError as error:
        raise BundleError(str(error)) from None
    try:
        payload = torch.load(io.BytesIO(verified.data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not its format
        first_line = (str(error).strip().splitlines() or [""])[0]  # torch's unpickler messages run to pages
        raise BundleError(f"{path}: not a MammoFL bundle ({type(error).__name__}: {first_line[:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise BundleError(f"{path}: format {found!r}, expected {FORMAT!r}")
    try:
        raw = json.loads(payload["meta"])
        meta = BundleMeta(
            model_config=_dataclass_from(ModelConfig, raw["model_config"]),
            preprocess_config=_dataclass_from(PreprocessConfig, raw["preprocess_config"]),
            class_names=tuple(raw["class_names"]),
            info=raw.get("info", {}),
            provenance=verified.provenance,
        )
    except BundleError as error:
        raise BundleError(f"{path}: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{path}: unreadable metadata ({type(error).__name__}: {error})") from None
    fingerprint = raw.get("preprocess_fingerprint")
    if fingerprint is not None and fingerprint != meta.preprocess_config.fingerprint():
        raise BundleError(f"{path}: made with another preprocessing algorithm (fingerprint {fingerprint[:12]}…, "
                          f"this version computes {meta.preprocess_config.fingerprint()[:12]}…): its model would "
                          f"see different pixels; use the MammoFL version that made it")
    return payload["weights"], meta


def load_bundle(path: Path, *, trusted: TrustedKeys) -> tuple[torch.nn.Module, BundleMeta]:
    """The model (eval mode, CPU) and its metadata, from a bundle signed by one of the `trusted` keys."""
    weights, meta = read_bundle(path, trusted=trusted)
    if tuple(meta.class_names) != tuple(CLASS_NAMES):
        raise BundleError(f"{path}: class order {meta.class_names} differs from this version's {CLASS_NAMES}")
    model = build_model(meta.model_config)
    try:
        load_weights(model, weights, source=str(path))
    except WeightsError as error:
        raise BundleError(str(error)) from None
    return model.eval(), meta


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    return torch.from_numpy(np.array(value, copy=True))


def _dataclass_from(cls, data: dict):
    """Rebuild a frozen config dataclass from its JSON form (lists back to tuples where the field holds one).
    Every field must be present: defaults change between versions, a model's settings must not."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise BundleError(f"{cls.__name__} in the bundle has fields this version does not know: {unknown}")
    missing = sorted(set(known) - set(data))
    if missing:  # a default filled in here could differ from the one the model was trained with
        raise BundleError(f"{cls.__name__} in the bundle lacks fields this version needs: {missing} (written "
                          f"by an older version; retrain or re-export the model)")
    values = {}
    for name, value in data.items():
        default = known[name].default
        values[name] = tuple(value) if isinstance(value, list) and isinstance(default, tuple) else value
    return cls(**values)
