"""The model bundle: a round trip gives the same model and metadata, in a process that never imports Flower."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from common.bundle import BundleError, BundleMeta, load_bundle, save_bundle
from common.models import ModelConfig, build_model
from common.preprocessing import PreprocessConfig
from common.records import CLASS_NAMES
from common.weights import WeightsError, exchanged_weights, load_weights
from conftest import REPO_ROOT
from signed_files import TRUSTED, bundle_signature, resign


@pytest.mark.parametrize("kind, shape", [("cnn", (2, 1, 64, 64)), ("effnet_head", (2, 192, 2, 2))])
def test_round_trip_gives_the_same_model(tmp_path, kind, shape):
    torch.manual_seed(0)
    config = ModelConfig(kind=kind, image_size=64, top_k=1)
    model = build_model(config).eval()
    meta = BundleMeta(model_config=config, preprocess_config=PreprocessConfig(size=64),
                      info={"round": 3, "final": {"auc_malignant": 0.7}})
    path = save_bundle(tmp_path / "model.mammofl", exchanged_weights(model), meta,
                       sign=bundle_signature(round=3, epsilon={"partition-0": 1.5}))
    loaded, loaded_meta = load_bundle(path, trusted=TRUSTED)
    assert dataclasses.replace(loaded_meta, provenance=None) == meta and loaded_meta.class_names == CLASS_NAMES
    assert (loaded_meta.provenance.round, loaded_meta.provenance.epsilon) == (3, {"partition-0": 1.5})
    x = torch.rand(shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not loaded.training


def test_bundle_loads_without_flower(tmp_path):
    config = ModelConfig(kind="cnn", image_size=64)
    save_bundle(tmp_path / "m.mammofl", exchanged_weights(build_model(config)),
                BundleMeta(model_config=config, preprocess_config=PreprocessConfig(size=64)), sign=bundle_signature())
    (tmp_path / "trusted.pub").write_bytes(TRUSTED.to_pem())
    script = textwrap.dedent(f"""
        import sys
        from common.bundle import load_bundle
        from common.signing import TrustedKeys
        trusted = TrustedKeys.read({str(tmp_path / "trusted.pub")!r})
        model, meta = load_bundle({str(tmp_path / "m.mammofl")!r}, trusted=trusted)
        assert meta.model_config.kind == "cnn" and meta.preprocess_config.size == 64
        assert not [m for m in sys.modules if m == "flwr" or m.startswith("flwr.")], "flwr was imported"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_not_a_bundle_and_mismatched_weights_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(BundleError, match="format None, expected 'mammofl-bundle/1'"):
        load_bundle(resign(other), trusted=TRUSTED)  # signed, yet not a bundle: the format check still holds
    garbage = tmp_path / "garbage.mammofl"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="not a MammoFL bundle"):
        load_bundle(resign(garbage), trusted=TRUSTED)
    model = build_model(ModelConfig(kind="cnn", image_size=64))
    weights = exchanged_weights(model)
    first = next(iter(weights))
    with pytest.raises(WeightsError, match="missing"):
        load_weights(model, {k: v for k, v in weights.items() if k != first})
    with pytest.raises(WeightsError, match=f"'{first}' has shape"):
        load_weights(model, {**weights, first: weights[first][..., :1]})


def test_a_bundle_missing_a_model_setting_is_refused_not_defaulted(tmp_path):
    """A bundle written before `input_norm` existed must not load with today's default (True)."""
    config = ModelConfig(kind="effnet_head", image_size=64, input_norm=False)
    path = save_bundle(tmp_path / "old.mammofl", exchanged_weights(build_model(config)),
                       BundleMeta(model_config=config, preprocess_config=PreprocessConfig(size=64)))
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    del meta["model_config"]["input_norm"]
    payload["meta"] = json.dumps(meta)
    torch.save(payload, path)
    resign(path)  # as an older version's coordinator signed it
    with pytest.raises(BundleError, match=r"ModelConfig in the bundle lacks fields this version needs: \['input_norm'\]"):
        load_bundle(path, trusted=TRUSTED)
