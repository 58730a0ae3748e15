"""Cutting one data set into virtual hospitals, always by PATIENT (both views of a patient stay together).

Pure functions on :class:`~common.records.ImageRecord` lists, deterministic for a given seed; the simulation's
client (which partition am I?), its coordinator (which patients are the held-out test set?) and the partition
plots all call the same code, so they agree.

Schemes:

- ``iid``: patients shuffled and dealt round-robin within each patient label, so every hospital gets about the
  same number of patients and the same class mix.
- ``dirichlet``: label skew. For each patient label, hospital shares are drawn from Dirichlet(alpha); small alpha
  gives hospitals dominated by one class. Draws are repeated (same generator) until every hospital has a patient.
- ``tissue``: site skew by mini-MIAS background tissue (F fatty, G glandular, D dense). Patients are ordered by
  tissue and cut into contiguous, equal-size blocks, so each hospital sees mostly one breast density, as screening
  sites with different populations or film processing do.

A patient's label is the most severe label among their images (malignant > benign > normal); their tissue the
most frequent background tissue among their images.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from common.records import CLASS_NAMES, LABEL_INDEX, ImageRecord
from common.splits import split_patients

SCHEMES = ("iid", "dirichlet", "tissue")
TISSUE_ORDER = ("F", "G", "D")
_MAX_DIRICHLET_DRAWS = 1000


def patients_of(records: Sequence[ImageRecord]) -> dict[str, list[ImageRecord]]:
    """Records grouped by patient id, patients in sorted order (deterministic)."""
    groups: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in records:
        groups[record.patient_id].append(record)
    return {pid: groups[pid] for pid in sorted(groups)}


def patient_label(images: Sequence[ImageRecord]) -> str:
    """Most severe label among a patient's images (unlabelled images count as normal)."""
    return CLASS_NAMES[max(LABEL_INDEX.get(r.label or "normal", 0) for r in images)]


def patient_tissue(images: Sequence[ImageRecord]) -> str | None:
    """Most frequent background tissue among a patient's images (ties: F before G before D)."""
    counts = Counter(r.background_tissue for r in images if r.background_tissue)
    if not counts:
        return None
    return max(counts, key=lambda t: (counts[t], -_tissue_rank(t)))


def select_patients(records: Sequence[ImageRecord], *, max_patients: int, seed: int) -> list[ImageRecord]:
    """At most `max_patients` patients (0 = all), drawn stratified by patient label; records in input order."""
    groups = patients_of(records)
    if max_patients <= 0 or max_patients >= len(groups):
        return list(records)
    by_label = _ids_by_label(groups, np.random.default_rng(seed))
    order = _interleave(by_label)  # round-robin over labels keeps the class mix
    keep = set(order[:max_patients])
    return [r for r in records if r.patient_id in keep]


def holdout_patients(records: Sequence[ImageRecord], *, fraction: float,
                     seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split into (pool, held-out test) by patient, stratified by patient label (``common.splits``);
    fraction 0 = no test set."""
    if fraction <= 0:
        return list(records), []
    assignment = split_patients([r.patient_id for r in records], [r.label for r in records],
                                fractions=(1.0 - fraction, 0.0, fraction), seed=seed)
    test = {p for p, split in assignment.items() if split == "test"}
    if not test or len(test) == len(assignment):
        raise ValueError(f"a test fraction of {fraction} leaves no patients on one side "
                         f"({len(assignment)} patients)")
    return [r for r in records if r.patient_id not in test], [r for r in records if r.patient_id in test]


def partition_patients(records: Sequence[ImageRecord], *, num_partitions: int, scheme: str, seed: int,
                       alpha: float = 0.5) -> list[list[ImageRecord]]:
    """Cut `records` into `num_partitions` hospitals by patient; every hospital gets at least one patient."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    groups = patients_of(records)
    if num_partitions < 1 or len(groups) < num_partitions:
        raise ValueError(f"cannot cut {len(groups)} patients into {num_partitions} hospitals")
    rng = np.random.default_rng([seed, 11])
    if scheme == "iid":
        assignment = _deal(_ids_by_label(groups, rng), num_partitions)
    elif scheme == "dirichlet":
        assignment = _dirichlet(_ids_by_label(groups, rng), num_partitions, alpha, rng)
    else:
        assignment = _by_tissue(groups, num_partitions, rng)
    return [[r for r in records if assignment[r.patient_id] == k] for k in range(num_partitions)]


def partition_summary(partitions: Sequence[Sequence[ImageRecord]]) -> list[dict]:
    """Counts per hospital (images per class, per tissue, patients) for reports and plots."""
    rows = []
    for k, part in enumerate(partitions):
        rows.append({
            "partition": k,
            "n_images": len(part),
            "n_patients": len({r.patient_id for r in part}),
            "class_counts": {c: sum(1 for r in part if r.label == c) for c in CLASS_NAMES},
            "tissue_counts": {t: sum(1 for r in part if r.background_tissue == t) for t in TISSUE_ORDER},
        })
    return rows


# ---------------------------------------------------------------- internals
def _tissue_rank(tissue: str | None) -> int:
    return TISSUE_ORDER.index(tissue) if tissue in TISSUE_ORDER else len(TISSUE_ORDER)


def _ids_by_label(groups: dict[str, list[ImageRecord]], rng: np.random.Generator) -> dict[str, list[str]]:
    by_label: dict[str, list[str]] = {c: [] for c in CLASS_NAMES}
    for pid, images in groups.items():
        by_label[patient_label(images)].append(pid)
    for ids in by_label.values():
        rng.shuffle(ids)
    return by_label


def _interleave(by_label: dict[str, list[str]]) -> list[str]:
    """Patients taken in proportion to their label's share: each label's patients spread evenly in [0, 1)."""
    keyed = []
    for c, ids in by_label.items():
        n = len(ids)
        keyed.extend(((i + 0.5) / n, LABEL_INDEX[c], pid) for i, pid in enumerate(ids))
    return [pid for _, _, pid in sorted(keyed)]


def _deal(by_label: dict[str, list[str]], n: int) -> dict[str, int]:
    """Round-robin over all patients, label by label, continuing the rotation (balanced sizes and mixes)."""
    assignment: dict[str, int] = {}
    turn = 0
    for c in CLASS_NAMES:
        for pid in by_label[c]:
            assignment[pid] = turn % n
            turn += 1
    return assignment


def _dirichlet(by_label: dict[str, list[str]], n: int, alpha: float, rng: np.random.Generator) -> dict[str, int]:
    for _ in range(_MAX_DIRICHLET_DRAWS):
        assignment: dict[str, int] = {}
        for c in CLASS_NAMES:
            ids = by_label[c]
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(ids)).round().astype(int)
            for k, chunk in enumerate(np.split(np.asarray(ids, dtype=object), cuts)):
                assignment.update({pid: k for pid in chunk})
        if len(set(assignment.values())) == n:
            return assignment
    raise ValueError(f"Dirichlet(alpha={alpha}) left a hospital without patients in {_MAX_DIRICHLET_DRAWS} "
                     f"draws; use fewer hospitals or a larger alpha")


def _by_tissue(groups: dict[str, list[ImageRecord]], n: int, rng: np.random.Generator) -> dict[str, int]:
    ids = list(groups)
    rng.shuffle(ids)
    ids.sort(key=lambda pid: _tissue_rank(patient_tissue(groups[pid])))  # stable: shuffled within a tissue
    blocks = np.array_split(np.arange(len(ids)), n)
    return {ids[i]: k for k, block in enumerate(blocks) for i in block}
