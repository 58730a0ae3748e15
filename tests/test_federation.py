"""One in-process federation on Flower's Simulation Engine: the project's real apps, real Opacus, real mini-MIAS.

Two virtual hospitals, tiny images, two rounds; in round 2 hospital 1 crashes inside train (a Flower mod raises,
as a node dying mid-round does) and the federation goes on with hospital 0. The run is then resumed from its
last checkpoint for a third round in which hospital 1's own budget (node config max-epsilon) is exhausted: it
refuses, the refusal is counted, and the run still completes. Checked: the run-directory contract, checkpoints,
the bundle, and epsilon growing across rounds and across the resumed run (the ledgers live on the nodes' disks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import MessageType

from client.app import make_client_app
from client.hospital_data import held_out_test_set
from common.bundle import load_bundle
from common.signing import TrustedKeys
from common.evaluation import evaluate_model
from server.app import make_server_app
from server.run_directory import load_metrics, outcome_entry

pytestmark = pytest.mark.slow

BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
FINAL_KEYS = {"auc_malignant", "auc_benign_vs_malignant", "accuracy", "precision", "recall", "specificity",
              "f1_macro", "confusion_matrix", "class_names"}


def crash_hospital_1_in_round_2(msg, context, call_next):
    """A Flower mod: hospital 1 dies while training round 2."""
    if (msg.metadata.message_type == MessageType.TRAIN and context.node_config["partition-id"] == 1
            and msg.content["config"]["server-round"] == 2):
        raise RuntimeError("hospital 1 crashed mid-round")
    return call_next(msg, context)


def central_evaluator(run):
    """The coordinator's held-out test set (simulation), scored with the shared evaluation function."""
    test = held_out_test_set(run, cache_dir=Path(run.sim_state_dir) / "coordinator")
    return lambda model: outcome_entry(evaluate_model(model, test))


def _simulate(config: dict, *, node_overrides=None, mods=()):
    from flwr.simulation import run_simulation

    run_simulation(server_app=make_server_app(overrides=config, central_evaluator=central_evaluator),
                   client_app=make_client_app(overrides=config, node_overrides=node_overrides, mods=list(mods)),
                   num_supernodes=2, backend_config=BACKEND)


def _check_operating_point_explanations_and_report(document, run_dir, state, meta):
    """The last round's score histograms choose the operating point; the final decisions are made at it; every
    hospital explained the model on exactly its validation images with lesions, kept its heatmaps, and sent counts."""
    from client.explanation_round import explainable_images
    from client.hospital_data import load_hospital
    from common.operating_point import ScoreHistogram, choose_operating_point, confusion_at
    from common.run_config import NodeConfig, RunConfig

    last = document["rounds"][-1]["federated_eval"]
    validation = ScoreHistogram.from_json(last["score_histogram"])
    assert validation.total == last["num_examples"]
    assert all("score_histogram" not in r["federated_eval"] for r in document["rounds"][:-1])
    final = document["final"]
    if validation.positives.sum() and validation.negatives.sum():
        point = choose_operating_point(validation, rule="sensitivity", target=0.9,
                                       source=final["operating_point"]["source"])
        assert final["operating_point"] == point.to_json() == meta.info["operating_point"]
        test = ScoreHistogram.from_json(final["score_histogram"])
        assert final["at_operating_point"]["confusion_matrix"] == confusion_at(test, point.threshold)
    else:  # a validation split without both classes cannot choose a threshold: said, not invented
        assert final["operating_point"] is None and "at_operating_point" not in final
    explanations = document["explanations"]
    assert explanations["asked"] == 2 and explanations["methods"] == ["cell_scores", "grad_cam"]
    run = RunConfig.from_flower(document["config"])
    for k in range(2):
        node = NodeConfig.from_flower({"partition-id": k, "num-partitions": 2}, run=run)
        expected = len(explainable_images(load_hospital(node, run).val_images))
        assert explanations["hospitals"][f"partition-{k}"] == {"images": expected}
        results = list((state / f"hospital-{k}" / "explanations").glob("run-*/results.json"))
        assert len(results) == 1 and len(json.loads(results[0].read_text())["images"]) == expected
    total = explanations["images"]
    for rates in explanations["per_method"].values():
        assert (rates["pointing_game"] is None) == (total == 0)
    report = (run_dir / "report.html").read_text()
    assert "Confusion matrix at the operating point" in report and (run_dir / "figures").is_dir()


def _ledger_epsilons(path):
    return [entry["epsilon"] for entry in json.loads(path.read_text())["entries"]]


def test_federation_survives_a_crash_resumes_and_respects_budgets(mias_dir, tmp_path):
    run_dir, state = tmp_path / "run", tmp_path / "hospitals"
    config = {"model": "cnn", "image-size": 64, "num-server-rounds": 2, "batch-size": 4, "min-nodes": 2,
              "min-train-replies": 1, "min-evaluate-replies": 1, "round-timeout": 300.0,
              "sim-data-dir": str(mias_dir), "sim-state-dir": str(state), "sim-max-patients": 12,
              "sim-test-fraction": 0.25, "val-fraction": 0.25, "run-dir": str(run_dir)}
    clear = {0: {"evaluation": "clear"}, 1: {"evaluation": "clear"}}  # exact counts, checked against local tallies
    _simulate(config, mods=[crash_hospital_1_in_round_2], node_overrides=clear)

    first = load_metrics(run_dir)
    assert first["status"] == "completed" and first["error"] is None
    assert [r["round"] for r in first["rounds"]] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "round-0001.npz", "round-0001.npz.sig", "round-0002.npz", "round-0002.npz.sig"]
    round1, round2 = first["rounds"]
    assert (round1["replies"]["train"]["valid"], round1["replies"]["train"]["failed"]) == (2, 0)
    assert (round2["replies"]["train"]["valid"], round2["replies"]["train"]["failed"]) == (1, 1)
    assert any("hospital 1 crashed mid-round" in note for note in round2["replies"]["train"]["notes"])
    for entry in first["rounds"]:
        assert entry["train_loss"] > 0 and entry["epsilon_max"] > 0
        assert entry["federated_eval"]["num_examples"] > 0
        assert entry["centralised_eval"]["num_examples"] == 6  # 3 held-out patients, 2 views each
    assert FINAL_KEYS <= set(first["final"]) and first["final"]["source"] == "centralised-test"
    assert first["final"]["class_names"] == ["normal", "benign", "malignant"]
    assert sum(map(sum, first["final"]["confusion_matrix"])) == 6
    assert set(first["privacy"]) == {"partition-0", "partition-1"}
    for hospital in first["privacy"].values():
        assert {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "steps", "accountant"} <= set(hospital)
    assert first["config"]["model"] == "cnn" and first["versions"]["flwr"] == "1.42.0"
    hospital0_ledger = state / "hospital-0" / "privacy-ledger.json"
    eps_run1 = _ledger_epsilons(hospital0_ledger)
    assert len(eps_run1) == 2 and eps_run1[0] < eps_run1[1] == pytest.approx(first["privacy"]["partition-0"]
                                                                              ["epsilon"])
    trusted = TrustedKeys.read(run_dir / "signing" / "trusted.pub")  # the key this simulation made for itself
    assert first["signing"]["generated"] and first["signing"]["key"] in trusted
    model, meta = load_bundle(run_dir / "model.mammofl", trusted=trusted)
    assert meta.model_config.kind == "cnn" and meta.preprocess_config.size == 64
    assert meta.provenance.round == 2 and meta.provenance.epsilon == {
        h: p["epsilon"] for h, p in first["privacy"].items()}
    _check_operating_point_explanations_and_report(first, run_dir, state, meta)

    resumed = {**config, "num-server-rounds": 3, "run-dir": "", "resume": str(run_dir)}
    _simulate(resumed, node_overrides={**clear, 1: {"evaluation": "clear", "max-epsilon": 0.01}})

    second = load_metrics(run_dir)
    assert second["status"] == "completed"
    assert [r["round"] for r in second["rounds"]] == [1, 2, 3]
    assert second["rounds"][:2] == first["rounds"]
    assert second["resumed"][0]["from_round"] == 2
    round3 = second["rounds"][2]
    assert (round3["replies"]["train"]["valid"], round3["replies"]["train"]["refused"]) == (1, 1)
    assert any("would exceed max-epsilon 0.01" in note for note in round3["replies"]["train"]["notes"])
    eps_all = _ledger_epsilons(hospital0_ledger)
    assert eps_all[:2] == eps_run1 and eps_all[2] > eps_all[1]  # the resumed run keeps adding to the ledger
    assert second["privacy"]["partition-0"]["epsilon"] == pytest.approx(eps_all[2])
    assert round3["epsilon_max"] == pytest.approx(eps_all[2])
    assert round3["epsilon_max"] > round1["epsilon_max"]
    assert second["privacy"]["partition-1"]["refusals"] == 1
    assert len(_ledger_epsilons(state / "hospital-1" / "privacy-ledger.json")) == 1  # trained in round 1 only
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-2:] == ["round-0003.npz",
                                                                                "round-0003.npz.sig"]
    assert second["signing"]["key"] == first["signing"]["key"]  # the resumed run signs with the run's key
    assert second["final"]["round"] == 3
