"""Patient-level, deterministic data splits: no patient's images ever sit on both sides of a split.

Patients are stratified by their worst label (normal < benign < malignant; unlabelled apart) so every split gets
its share of each class where the counts allow. The result depends only on the set of (patient, label) pairs and
the seed, never on the order of the input, so every site and every run computes the same split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.records import CLASS_NAMES, ImageRecord

SPLITS: tuple[str, ...] = ("train", "val", "test")
_UNLABELLED = "unlabelled"


def worst_labels(patient_ids: Sequence[str], labels: Sequence[str | None]) -> dict[str, str]:
    """Each patient's most severe label over their images ("unlabelled" when none of them has one)."""
    if len(patient_ids) != len(labels):
        raise ValueError(f"{len(patient_ids)} patient ids but {len(labels)} labels")
    rank = {name: i for i, name in enumerate(CLASS_NAMES)}
    worst: dict[str, int] = {}
    for patient, label in zip(patient_ids, labels, strict=True):
        if label is not None and label not in rank:
            raise ValueError(f"unknown label {label!r}; expected one of {CLASS_NAMES} or None")
        worst[str(patient)] = max(worst.get(str(patient), -1), rank[label] if label is not None else -1)
    return {patient: CLASS_NAMES[r] if r >= 0 else _UNLABELLED for patient, r in worst.items()}


def split_patients(
    patient_ids: Sequence[str],
    labels: Sequence[str | None],
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int,
) -> dict[str, str]:
    """Assign every patient to "train", "val" or "test", stratified by worst label.

    Split sizes are exactly ``fractions`` x number of patients (largest-remainder rounding); inside each stratum
    the patients are shuffled with ``seed`` and dealt out in proportion (rounded up or down by at most one).
    """
    fractions = _check_fractions(fractions)
    strata = _strata(patient_ids, labels, seed)
    groups = sorted(strata.values(), key=lambda members: (-len(members), members[0]))
    target = _apportion(sum(len(members) for members in groups), fractions)
    quotas = [[int(np.floor(len(members) * f)) for f in fractions] for members in groups]
    deficit = [target[j] - sum(q[j] for q in quotas) for j in range(len(SPLITS))]
    for members, quota in zip(groups, quotas):
        # leftovers: to a split still short of its overall target, preferring this stratum's largest remainder
        for _ in range(len(members) - sum(quota)):
            remainder = [len(members) * fractions[j] - quota[j] for j in range(len(SPLITS))]
            best = max(range(len(SPLITS)), key=lambda j: (deficit[j] > 0, remainder[j], deficit[j], -j))
            quota[best] += 1
            deficit[best] -= 1
    assignment: dict[str, str] = {}
    for members, quota in zip(groups, quotas):
        position = 0
        for j, name in enumerate(SPLITS):
            for patient in members[position : position + quota[j]]:
                assignment[patient] = name
            position += quota[j]
    return assignment


def kfold_patients(
    patient_ids: Sequence[str],
    labels: Sequence[str | None],
    *,
    k: int,
    seed: int,
) -> list[tuple[list[str], list[str]]]:
    """``k`` (train patients, test patients) pairs; every patient is tested exactly once, stratified by worst label.

    Patients of each stratum are shuffled with ``seed`` and dealt round-robin, the deal continuing across strata,
    so fold sizes differ by at most one.
    """
    strata = _strata(patient_ids, labels, seed)
    total = sum(len(members) for members in strata.values())
    if not isinstance(k, int) or k < 2 or k > total:
        raise ValueError(f"k must be an int in [2, {total}] (number of patients), got {k!r}")
    folds: list[list[str]] = [[] for _ in range(k)]
    position = 0
    for name in sorted(strata):
        for patient in strata[name]:
            folds[position % k].append(patient)
            position += 1
    everyone = sorted(p for fold in folds for p in fold)
    return [(sorted(set(everyone) - set(fold)), sorted(fold)) for fold in folds]


def split_records(
    records: Sequence[ImageRecord],
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int,
) -> dict[str, list[ImageRecord]]:
    """The records of each split ("train", "val", "test"), in input order, split by patient."""
    assignment = split_patients([r.patient_id for r in records], [r.label for r in records],
                                fractions=fractions, seed=seed)
    out: dict[str, list[ImageRecord]] = {name: [] for name in SPLITS}
    for record in records:
        out[assignment[str(record.patient_id)]].append(record)
    return out


def _strata(patient_ids: Sequence[str], labels: Sequence[str | None], seed: int) -> dict[str, list[str]]:
    """Stratum name -> its patients, sorted then shuffled with one generator in a fixed stratum order."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    worst = worst_labels(patient_ids, labels)
    if not worst:
        raise ValueError("no patients to split")
    rng = np.random.default_rng(int(seed))
    strata: dict[str, list[str]] = {}
    for name in (*CLASS_NAMES, _UNLABELLED):
        members = sorted(p for p, w in worst.items() if w == name)
        if members:
            strata[name] = [members[i] for i in rng.permutation(len(members))]
    return strata


def _apportion(total: int, fractions: tuple[float, ...]) -> list[int]:
    """Largest-remainder rounding of ``total * fractions`` (ties to the earlier split)."""
    exact = [total * f for f in fractions]
    counts = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(fractions)), key=lambda j: (-(exact[j] - counts[j]), j))
    for j in order[: total - sum(counts)]:
        counts[j] += 1
    return counts


def _check_fractions(fractions: tuple[float, float, float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not np.isfinite(f) or f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    return values  # type: ignore[return-value]
