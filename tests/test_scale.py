"""100 virtual hospitals on one machine: how mini-MIAS is cut for them, what is refused early, and a run that completes.

mini-MIAS has 161 patients; with a fifth held out for the coordinator's test set, 100 hospitals share 129: 71 get
one patient and 29 get two. At the demo's val-fraction (0.2) none keeps a validation split, so a federated
evaluation that needs every hospital's reply is refused before any work; at val-fraction 0.5 the 29 two-patient
hospitals validate on one patient.
"""

from __future__ import annotations

from collections import Counter

import pytest

from common.run_config import ConfigError
from simulations.hospitals import virtual_hospitals
from simulations.presets import resolve
from simulations.run import SimulationRequest, run_federated, run_mode


def test_hundred_hospitals_get_one_or_two_patients_each_and_no_patient_twice(mias_dir):
    hospitals = virtual_hospitals(mias_dir, resolve("demo", ["num-hospitals=100"]))
    patients = [{r.patient_id for r in part} for part in hospitals.partitions]
    assert Counter(len(p) for p in patients) == {1: 71, 2: 29}
    everyone = [p for site in patients for p in site]
    assert len(everyone) == len(set(everyone)) == 129
    assert not set(everyone) & {r.patient_id for r in hospitals.test}
    assert all(part for part in hospitals.partitions)
    assert hospitals.with_validation() == 0
    wider = virtual_hospitals(mias_dir, resolve("demo", ["num-hospitals=100", "val-fraction=0.5"]))
    assert wider.with_validation() == 29


def test_an_evaluation_that_cannot_get_its_replies_is_refused_before_any_work(mias_dir, tmp_path):
    request = SimulationRequest(config=resolve("demo", ["num-hospitals=100"]), mode="federated",
                                data_dir=mias_dir, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="only 0 of 100 hospitals get a validation split at val-fraction 0.2"):
        run_mode(request)
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_a_hundred_hospital_federation_completes(mias_dir, tmp_path):
    """The cheapest real 100-hospital run: the smoke preset's small CNN on 64-px images, one round, local DP."""
    config = resolve("smoke", ["num-hospitals=100", "sim-max-patients=0", "sim-test-fraction=0.2",
                               "val-fraction=0.5", "min-evaluate-replies=29", "dp-mode=local", "explain-methods=",
                               "batch-size=2", "round-timeout=1800"])  # cold caches on a shared 2-core box
    request = SimulationRequest(config=config, mode="federated", data_dir=mias_dir, run_dir=tmp_path / "run")
    result = run_federated(request)
    [entry] = result.document["rounds"]
    assert entry["round"] == 1
    assert entry["replies"]["train"]["valid"] == 100
    evaluation = entry["replies"]["evaluate"]
    # The 71 one-patient sites have no validation images: they refuse to evaluate (nothing released); the 29
    # two-patient sites release noised counts.
    assert (evaluation["valid"], evaluation["refused"], evaluation["rejected"], evaluation["failed"]) == (29, 71, 0, 0)
    assert len(result.document["privacy"]) == 100
    assert result.bundles[0].is_file()
