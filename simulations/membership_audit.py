"""The release audit of a simulation: membership inference on the final model, and the release gate.

After a completed run the simulation process (which holds every virtual hospital's data, unlike a deployed
coordinator) attacks the released model with both attacks of ``common.membership_inference``: members are the
hospitals' training splits (in a ``local`` baseline, each hospital's own split for its own model), non-members
the held-out test set; the larger side is subsampled to equal counts with the run's ``seed``. Per-example losses
live only in this process's memory; ``metrics.json`` gets the aggregate section ``membership_inference``
(``server.run_directory``) with the gate's verdict.

Gate: run config ``sim-max-attack-advantage`` (default 0 = off). When the best attack's advantage exceeds it, or the
audit cannot run while the gate is on, the release is withheld: ``model.mammofl`` is renamed ``model.unreleased``
and :class:`ReleaseWithheld` is raised (``mammofl-sim`` exits 1 with its message). Why off by default: the
advantage is a maximum over thresholds measured on the held-out set (about 64 images of mini-MIAS), so a model that
leaks nothing already reaches 0.09 (median) and 0.20 one time in 20 at 64 vs 64 images (``chance_advantage_95`` in
the section); a default bound low enough to mean something would withhold private models by chance, one high enough
not to would pass nearly everything. Set it knowing that level (README, "Membership inference").
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from common.membership_audit import audit_model
from common.run_config import RunConfig
from server.run_directory import BUNDLE_FILE, RunDirectory, load_metrics
from simulations.run import SimulationError, SimulationResult

log = logging.getLogger(__name__)

UNRELEASED_FILE = "model.unreleased"


class ReleaseWithheld(SimulationError):
    """The run completed but its model failed the release gate; the message says why and where the model is."""


def audit_release(run: RunConfig, result: SimulationResult, *, num_hospitals: int) -> None:
    """Audit every model `result` released, record it in its ``metrics.json``, apply the gate (module doc)."""
    from simulations.baselines import load_hospitals
    from simulations.run import held_out_test

    bound = run.sim_max_attack_advantage
    problems: list[str] = []
    try:
        test = held_out_test(run) if run.sim_test_fraction > 0 else None
        hospitals = load_hospitals(run, num_hospitals)
    except Exception as error:  # noqa: BLE001 - recorded; fatal only when the gate is on
        test, hospitals, setup_error = None, [], f"{type(error).__name__}: {error}"
    else:
        setup_error = None if test is not None else "no held-out test set (sim-test-fraction is 0)"
    if result.sub_runs:
        targets = [(path, [hospitals[k].train] if hospitals else []) for k, path in enumerate(result.sub_runs)]
    else:
        targets = [(result.run_dir, [h.train for h in hospitals])]
    sections = {}
    for run_dir, members in targets:
        section = _audit_one(run, run_dir, members, test, setup_error=setup_error)
        section["gate"] = gate = _gate(section, bound)
        if not gate["passed"]:
            problems.append(_withhold(run_dir, section, bound))
        _record(run_dir, section)
        sections[run_dir] = section
    if result.sub_runs:
        _record(result.run_dir, _summary(sections, bound))
    if problems:
        raise ReleaseWithheld("release withheld: " + "; ".join(problems))


def _audit_one(run: RunConfig, run_dir: Path, members: list, test, *, setup_error: str | None) -> dict:
    if setup_error is not None:
        return {"error": setup_error}
    from common.bundle import load_bundle
    from server.signing_keys import run_trusted_keys
    from simulations.baselines import pooled

    try:
        model, _ = load_bundle(run_dir / BUNDLE_FILE, trusted=run_trusted_keys(run, run_dir))
        section = audit_model(model, pooled(members), test, seed=run.seed).to_json()
    except Exception as error:  # noqa: BLE001 - recorded; fatal only when the gate is on
        return {"error": f"{type(error).__name__}: {error}"}
    log.info("membership inference on %s: advantage %.3f (chance level %.3f at 95%%), AUC %.3f, %d members vs "
             "%d non-members", run_dir.name, section["advantage"], section["chance_advantage_95"], section["auc"],
             section["members"], section["non_members"])
    return section


def _gate(section: dict, bound: float) -> dict:
    if bound <= 0:
        return {"max_attack_advantage": bound, "enabled": False, "passed": True}
    advantage = section.get("advantage")
    passed = isinstance(advantage, float) and math.isfinite(advantage) and advantage <= bound
    return {"max_attack_advantage": bound, "enabled": True, "passed": passed}


def _withhold(run_dir: Path, section: dict, bound: float) -> str:
    bundle, aside = run_dir / BUNDLE_FILE, run_dir / UNRELEASED_FILE
    if bundle.is_file():
        bundle.replace(aside)
        signature = bundle.with_name(bundle.name + ".sig")
        if signature.is_file():  # the signature travels with the withheld model
            signature.replace(aside.with_name(aside.name + ".sig"))
    section["gate"]["model"] = UNRELEASED_FILE
    if "error" in section:
        why = f"the membership-inference audit could not run ({section['error']})"
    else:
        best = max(section["attacks"].values(), key=lambda a: a["advantage"])
        why = (f"membership-inference advantage {section['advantage']:.4f} ({best['name']}, "
               f"{section['members']} members vs {section['non_members']} non-members; chance level "
               f"{section['chance_advantage_95']:.3f})")
    return f"{why} exceeds run config sim-max-attack-advantage {bound:g}; the model was moved to {aside}"


def _record(run_dir: Path, section: dict) -> None:
    directory = RunDirectory(run_dir, load_metrics(run_dir))
    directory.set_membership_inference(section)


def _summary(sections: dict[Path, dict], bound: float) -> dict:
    """A local baseline's top-level section: each hospital's model, and the largest advantage and AUC."""
    audited = [s for s in sections.values() if "error" not in s]
    out: dict = {"per_hospital": {path.name: s for path, s in sections.items()},
                 "gate": {"max_attack_advantage": bound, "enabled": bound > 0,
                          "passed": all(s["gate"]["passed"] for s in sections.values())}}
    if audited:
        out.update(advantage=max(s["advantage"] for s in audited), auc=max(s["auc"] for s in audited),
                   attack_names=audited[0]["attack_names"])
    return out
