"""Federated explanations: pooled localisation counts, malformed replies left out and named."""

from __future__ import annotations

import pytest

from common import wire
from common.run_config import EXPLANATION_METHODS, ConfigError, RunConfig
from server.federated_explanations import summarise_explanations

METHODS = ("cell_scores", "grad_cam")


def _reply(n, baseline, hits, mass):
    metrics = {wire.EXPLAINED_IMAGES: n, wire.EXPLAIN_BASELINE_SUM: baseline}
    for method, h, m in zip(METHODS, hits, mass):
        metrics[wire.explain_key(method, "hits")] = h
        metrics[wire.explain_key(method, "mass-sum")] = m
    return metrics


def test_rates_are_pooled_over_images_not_averaged_over_hospitals():
    summary = summarise_explanations([
        ("partition-0", None, _reply(2, 0.1, (2, 1), (1.0, 0.5))),
        ("partition-1", None, _reply(6, 0.5, (3, 0), (1.4, 0.3))),
    ], METHODS)
    assert summary["images"] == 8
    assert summary["per_method"]["cell_scores"] == {"pointing_game": 5 / 8, "mass_inside": pytest.approx(2.4 / 8),
                                                    "random_baseline": pytest.approx(0.6 / 8)}
    assert summary["per_method"]["grad_cam"]["pointing_game"] == 1 / 8
    assert summary["hospitals"] == {"partition-0": {"images": 2}, "partition-1": {"images": 6}}


@pytest.mark.parametrize("bad, why", [
    (_reply(2, 0.1, (3, 0), (0.1, 0.1)), "must be a count <= 2"),
    (_reply(2.5, 0.1, (1, 0), (0.1, 0.1)), "must be a count"),
    (_reply(2, 0.1, (1, 0), (float("nan"), 0.1)), "mass-sum"),
    (_reply(2, -1.0, (1, 0), (0.1, 0.1)), "baseline-sum"),
    (None, "no metrics"),
])
def test_a_malformed_reply_is_left_out_and_named(bad, why):
    summary = summarise_explanations([("node-7", None, bad), ("node-8", None, _reply(1, 0.2, (1, 1), (0.5, 0.4)))],
                                     METHODS)
    assert summary["images"] == 1
    assert why in summary["hospitals"]["node-7"]["error"]
    assert summary["notes"][0].startswith("node-7: rejected")


def test_failed_hospitals_are_recorded_and_no_image_gives_no_rate():
    summary = summarise_explanations([("node-3", "NodeFailure: ...", None)], METHODS)
    assert summary["hospitals"] == {"node-3": {"error": "NodeFailure: ..."}}
    assert summary["per_method"]["grad_cam"] == {"pointing_game": None, "mass_inside": None, "random_baseline": None}


def test_run_config_knows_exactly_the_explanation_methods():
    from common.explanations import METHODS as REGISTRY

    assert set(EXPLANATION_METHODS) == set(REGISTRY)
    assert RunConfig.from_flower({"explain-methods": "grad_cam, occlusion"}).explain_method_names == (
        "grad_cam", "occlusion")
    assert RunConfig.from_flower({"explain-methods": ""}).explain_method_names == ()
    with pytest.raises(ConfigError, match="explain-methods.*shap"):
        RunConfig.from_flower({"explain-methods": "grad_cam,shap"})
