"""The privacy accountant against Opacus' own accountants; no model involved."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy import PrivacyAccountant

DELTA = 1e-5
# DESIGN §5: sigma 1.1, sample rate 1/8, 8 steps (one epoch) per round, delta 1e-5 (RDP).
ROUND = dict(noise_multiplier=1.1, sample_rate=1 / 8, steps=8)


def _opacus_rdp(history) -> float:
    fresh = RDPAccountant()
    fresh.history = list(history)
    return fresh.get_epsilon(delta=DELTA)


def test_fixed_history_gives_opacus_epsilon_exactly():
    acc = PrivacyAccountant("rdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=500)
    acc.step(noise_multiplier=0.8, sample_rate=0.02, steps=100)
    assert acc.history == [(1.0, 0.01, 500), (0.8, 0.02, 100)]
    assert acc.epsilon(DELTA) == _opacus_rdp([(1.0, 0.01, 500), (0.8, 0.02, 100)])


def test_steps_merge_like_opacus_step_by_step():
    mine, theirs = PrivacyAccountant("rdp"), RDPAccountant()
    for noise, rate in [(1.0, 0.1)] * 5 + [(1.2, 0.1)] * 3 + [(1.0, 0.1)] * 2:
        mine.step(noise_multiplier=noise, sample_rate=rate)
        theirs.step(noise_multiplier=noise, sample_rate=rate)
    assert mine.history == theirs.history == [(1.0, 0.1, 5), (1.2, 0.1, 3), (1.0, 0.1, 2)]
    assert mine.state_dict() == dict(theirs.state_dict())
    assert mine.epsilon(DELTA) == theirs.get_epsilon(delta=DELTA)


def test_design_three_rounds_3_15_3_91_4_52():
    acc = PrivacyAccountant()
    assert acc.mechanism == "rdp" and acc.epsilon(DELTA) == 0.0
    eps = []
    for _ in range(3):
        acc.step(**ROUND)
        eps.append(acc.epsilon(DELTA))
    assert [round(e, 2) for e in eps] == [3.15, 3.91, 4.52]
    assert eps[0] < eps[1] < eps[2]
    assert eps[2] == _opacus_rdp([(1.1, 1 / 8, 24)])


def test_state_round_trip_through_json_and_opacus():
    acc = PrivacyAccountant("rdp")
    acc.step(**ROUND)
    acc.step(noise_multiplier=0.9, sample_rate=0.25, steps=4)
    restored = PrivacyAccountant.from_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored.history == acc.history and restored.mechanism == "rdp"
    assert restored.epsilon(DELTA) == acc.epsilon(DELTA)
    opacus = RDPAccountant()
    opacus.load_state_dict(acc.state_dict())
    assert PrivacyAccountant.from_opacus(opacus).state_dict() == acc.state_dict()


def test_epsilon_after_does_not_mutate():
    acc = PrivacyAccountant()
    acc.step(**ROUND)
    before = acc.state_dict()
    future = acc.epsilon_after(delta=DELTA, **ROUND)
    assert acc.state_dict() == before
    acc.step(**ROUND)
    assert future == acc.epsilon(DELTA)


def test_prv_is_selectable_and_matches_opacus():
    acc = PrivacyAccountant("prv", history=[(1.1, 1 / 8, 16)])
    fresh = PRVAccountant()
    fresh.history = [(1.1, 1 / 8, 16)]
    assert acc.state_dict()["mechanism"] == "prv"
    assert acc.epsilon(DELTA) == pytest.approx(fresh.get_epsilon(delta=DELTA), abs=1e-9)


def test_gdp_refuses_changing_noise():
    acc = PrivacyAccountant("gdp", history=[(1.1, 1 / 8, 16)])
    assert acc.epsilon(DELTA) > 0
    with pytest.raises(ValueError, match="gdp"):
        acc.step(noise_multiplier=0.5, sample_rate=1 / 8)
    assert acc.history == [(1.1, 1 / 8, 16)]


@pytest.mark.parametrize("bad", [{"mechanism": "rdp"}, {"history": [(0.0, 0.1, 3)]},
                                 {"history": [(1.0, 1.5, 3)]}])
def test_invalid_state_refused(bad):
    acc = PrivacyAccountant()
    with pytest.raises(ValueError):
        acc.load_state_dict(bad)


def test_unknown_mechanism_refused():
    with pytest.raises(ValueError, match="unknown accountant"):
        PrivacyAccountant("moments")
