"""Patient-level splits on the real mini-MIAS records and on small hand-made cases."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.readers.mias import read_mias_records
from common.splits import kfold_patients, split_patients, split_records, worst_labels


@pytest.fixture(scope="module")
def mias_records(mias_dir):
    records = read_mias_records(mias_dir)
    assert len(records) == 322
    return records


@pytest.fixture(scope="module")
def ids_and_labels(mias_records):
    return [r.patient_id for r in mias_records], [r.label for r in mias_records]


def test_no_patient_crosses_a_split_on_mini_mias(mias_records):
    parts = split_records(mias_records, seed=7)
    patients = {name: {r.patient_id for r in records} for name, records in parts.items()}
    assert patients["train"].isdisjoint(patients["val"])
    assert patients["train"].isdisjoint(patients["test"])
    assert patients["val"].isdisjoint(patients["test"])
    assert sum(len(records) for records in parts.values()) == 322
    assert len(set().union(*patients.values())) == 161
    # both images (left and right breast) of every patient sit in the same split
    assert all(count == 2 for records in parts.values() for count in Counter(r.patient_id for r in records).values())


def test_sizes_and_strata_on_mini_mias(ids_and_labels):
    ids, labels = ids_and_labels
    split = split_patients(ids, labels, seed=0)
    assert set(split) == set(ids) and set(split.values()) == {"train", "val", "test"}
    sizes = Counter(split.values())
    assert sizes == {"train": 113, "val": 24, "test": 24}  # 161 x (0.7, 0.15, 0.15), largest remainder
    worst = worst_labels(ids, labels)
    per_class = Counter(worst.values())
    assert per_class == {"normal": 53, "benign": 56, "malignant": 52}  # worst label over a patient's two images
    for name in ("normal", "benign", "malignant"):
        in_test = sum(1 for p, s in split.items() if s == "test" and worst[p] == name)
        assert abs(in_test - 0.15 * per_class[name]) <= 1.0, name


def test_same_seed_same_split_other_seed_other_split(ids_and_labels):
    ids, labels = ids_and_labels
    assert split_patients(ids, labels, seed=3) == split_patients(ids, labels, seed=3)
    assert split_patients(ids, labels, seed=3) != split_patients(ids, labels, seed=4)
    # order of the input does not matter
    assert split_patients(ids[::-1], labels[::-1], seed=3) == split_patients(ids, labels, seed=3)


def test_kfold_on_mini_mias(ids_and_labels):
    ids, labels = ids_and_labels
    folds = kfold_patients(ids, labels, k=5, seed=1)
    assert len(folds) == 5
    tested = [p for _, test in folds for p in test]
    assert sorted(tested) == sorted(set(ids)), "every patient is tested exactly once"
    for train, test in folds:
        assert set(train).isdisjoint(test) and len(train) + len(test) == 161
    assert sorted(len(test) for _, test in folds) == [32, 32, 32, 32, 33]
    worst = worst_labels(ids, labels)
    for _, test in folds:
        malignant = sum(worst[p] == "malignant" for p in test)
        assert malignant in (10, 11)  # 52 malignant patients dealt over 5 folds
    assert folds == kfold_patients(ids, labels, k=5, seed=1)
    assert folds != kfold_patients(ids, labels, k=5, seed=2)


def test_worst_label_decides_the_stratum():
    ids = ["a", "a", "b", "b", "c"]
    labels = ["normal", "malignant", "benign", "normal", None]
    assert worst_labels(ids, labels) == {"a": "malignant", "b": "benign", "c": "unlabelled"}


def test_zero_fraction_split_stays_empty_and_bad_arguments_are_refused():
    ids = [str(i) for i in range(20)]
    labels = ["normal"] * 10 + ["malignant"] * 10
    split = split_patients(ids, labels, fractions=(0.8, 0.2, 0.0), seed=5)
    assert Counter(split.values()) == {"train": 16, "val": 4}
    with pytest.raises(ValueError, match="fractions"):
        split_patients(ids, labels, fractions=(0.5, 0.5, 0.5), seed=0)
    with pytest.raises(ValueError, match="labels"):
        split_patients(ids, labels[:-1], seed=0)
    with pytest.raises(ValueError, match="unknown label"):
        split_patients(ids, ["sick"] * 20, seed=0)
    with pytest.raises(ValueError, match="k must"):
        kfold_patients(ids, labels, k=21, seed=0)


@settings(max_examples=80, deadline=None)
@given(
    labels=st.lists(st.sampled_from(["normal", "benign", "malignant", None]), min_size=3, max_size=60),
    images_per_patient=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    k=st.integers(2, 5),
)
def test_every_patient_assigned_once(labels, images_per_patient, seed, k):
    ids = [f"p{i // images_per_patient}" for i in range(len(labels))]
    patients = set(ids)
    split = split_patients(ids, labels, seed=seed)
    assert set(split) == patients
    sizes = Counter(split.values())
    n = len(patients)
    assert all(abs(sizes[name] - f * n) < 1 for name, f in zip(("train", "val", "test"), (0.7, 0.15, 0.15)))
    if k <= n:
        folds = kfold_patients(ids, labels, k=k, seed=seed)
        tested = [p for _, test in folds for p in test]
        assert sorted(tested) == sorted(patients)
        assert max(len(t) for _, t in folds) - min(len(t) for _, t in folds) <= 1
