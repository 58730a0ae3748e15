"""A hospital's data path on the real mini-MIAS records: partitions by patient, splits, cached preprocessing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from client.hospital_data import (
    HospitalDataError,
    build_datasets,
    hospital_records,
    labelled_image,
    load_hospital,
    preprocess_records,
    simulation_test_records,
    split_train_val,
)
from client.preprocess_cache import PreprocessCache
from client.readers.mias import read_mias_records
from common.models.cell_targets import cell_coverage
from common.partitioning import (
    partition_patients,
    partition_summary,
    patient_label,
    patients_of,
    select_patients,
)
from common.preprocessing import PreprocessConfig
from common.records import ImageRecord
from common.run_config import NodeConfig, RunConfig


@pytest.fixture(scope="module")
def mias_records(mias_dir):
    return read_mias_records(mias_dir)


def _patients(records):
    return {r.patient_id for r in records}


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "tissue"])
def test_partitions_cover_every_patient_once_and_are_deterministic(mias_records, scheme):
    parts = partition_patients(mias_records, num_partitions=3, scheme=scheme, seed=7, alpha=0.5)
    assert sum(len(p) for p in parts) == 322
    patient_sets = [_patients(p) for p in parts]
    assert sum(len(s) for s in patient_sets) == 161 == len(set().union(*patient_sets))  # disjoint, complete
    assert all(parts)
    again = partition_patients(mias_records, num_partitions=3, scheme=scheme, seed=7, alpha=0.5)
    assert [[r.path for r in p] for p in again] == [[r.path for r in p] for p in parts]


def test_iid_is_balanced_and_dirichlet_is_label_skewed(mias_records):
    iid = partition_summary(partition_patients(mias_records, num_partitions=3, scheme="iid", seed=1))
    assert [row["n_patients"] for row in iid] == [54, 54, 53]
    malignant = [row["class_counts"]["malignant"] for row in iid]
    assert max(malignant) - min(malignant) <= 4
    skewed = partition_patients(mias_records, num_partitions=3, scheme="dirichlet", seed=1, alpha=0.1)
    shares = [Counter(patient_label(imgs) for imgs in patients_of(p).values()) for p in skewed]
    # with alpha = 0.1 some hospital holds at least 80 % of some class's patients
    totals = Counter(patient_label(imgs) for imgs in patients_of(mias_records).values())
    assert max(s[c] / totals[c] for s in shares for c in totals) >= 0.8


def test_tissue_scheme_gives_each_site_one_dominant_density(mias_records):
    rows = partition_summary(partition_patients(mias_records, num_partitions=3, scheme="tissue", seed=3))
    dominant = [max(row["tissue_counts"], key=row["tissue_counts"].get) for row in rows]
    assert dominant == ["F", "G", "D"]
    for row in rows:
        counts = row["tissue_counts"]
        assert max(counts.values()) / sum(counts.values()) >= 0.8


def test_too_many_hospitals_for_the_patients_is_an_error(mias_records):
    few = select_patients(mias_records, max_patients=2, seed=0)
    assert len(_patients(few)) == 2
    with pytest.raises(ValueError, match="cannot cut 2 patients into 3 hospitals"):
        partition_patients(few, num_partitions=3, scheme="iid", seed=0)


def test_simulation_hospitals_and_test_set_never_share_a_patient(mias_dir, tmp_path):
    run = RunConfig(sim_data_dir=str(mias_dir), sim_state_dir=str(tmp_path), sim_max_patients=30,
                    sim_test_fraction=0.2, seed=5)
    hospitals = [hospital_records(NodeConfig.from_flower({"partition-id": k, "num-partitions": 2}, run=run), run)
                 for k in range(2)]
    test = simulation_test_records(run)
    sets = [_patients(h) for h in hospitals] + [_patients(test)]
    assert [len(s) for s in sets] == [12, 12, 6]
    assert len(set().union(*sets)) == 30
    train, val = split_train_val(hospitals[0], val_fraction=0.25, seed=5)
    assert _patients(train).isdisjoint(_patients(val)) and len(_patients(val)) == 3
    assert sorted(r.path for r in train + val) == sorted(r.path for r in hospitals[0])


def test_deployment_node_reads_a_mias_folder_or_refuses_a_plain_one(mias_dir, tmp_path):
    run = RunConfig()
    node = NodeConfig.from_flower({"data-dir": str(mias_dir), "state-dir": str(tmp_path), "max-epsilon": 8}, run=run)
    assert len(hospital_records(node, run)) == 322
    empty = NodeConfig.from_flower({"data-dir": str(tmp_path), "state-dir": str(tmp_path), "max-epsilon": 8}, run=run)
    with pytest.raises(HospitalDataError, match="not a mini-MIAS folder .* 'manifest' is not set"):
        hospital_records(empty, run)


def test_preprocessing_is_cached_and_undecodable_files_are_counted(mias_records, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    records = mias_records[:2] + [ImageRecord(path=broken, label="normal", patient_id="x")]
    cache = PreprocessCache(tmp_path / "cache")
    config = RunConfig(image_size=64).preprocess_config()
    prepared, skipped = preprocess_records(records, cache=cache, config=config)
    assert (len(prepared), skipped) == (2, 1)
    assert prepared[0].preprocessed.image.shape == (64, 64)
    again, _ = preprocess_records(records[:2], cache=cache, config=config)
    np.testing.assert_array_equal(again[1].preprocessed.image, prepared[1].preprocessed.image)
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 2


def test_load_hospital_builds_the_model_kinds_dataset_with_lesion_cells(mias_dir, tmp_path):
    run = RunConfig(model="cnn", image_size=64, sim_data_dir=str(mias_dir), sim_state_dir=str(tmp_path),
                    sim_max_patients=4, sim_test_fraction=0.25, val_fraction=0.34, seed=2)
    node = NodeConfig.from_flower({"partition-id": 0, "num-partitions": 1}, run=run)
    data = load_hospital(node, run)
    assert (data.n_patients, data.n_train_images, data.n_val_images, data.n_skipped) == (3, 4, 2, 0)
    assert (len(data.train), len(data.val)) == (4, 2)
    inputs, label, cells = data.train[0]
    assert tuple(inputs.shape) == (1, 64, 64) and isinstance(label, int) and cells.dtype == torch.int64
    records = hospital_records(node, run)
    lesioned = next(r for r in records if r.lesions)
    prepared, _ = preprocess_records([lesioned], cache=PreprocessCache(node.cache_dir / "preprocessed"),
                                     config=run.preprocess_config())
    item = labelled_image(prepared[0])
    assert item.label == lesioned.label_index > 0
    assert item.lesion_mask is not None and item.lesion_mask.any() and item.lesion_mask.shape == (64, 64)


def test_mias_lesion_circles_become_lesion_cells(mias_records, tmp_path):
    """mdb003 (normal) and mdb005 (benign, two circles) at 128 px: the cell holding each mapped lesion centre
    is a lesion cell inside the breast, the normal image's cells are all normal."""
    records = {r.path.stem: r for r in mias_records}
    prepared, _ = preprocess_records([records["mdb003"], records["mdb005"]],
                                     cache=PreprocessCache(tmp_path / "preprocessed"),
                                     config=PreprocessConfig(size=128))
    run = RunConfig(model="cnn", image_size=128)  # 4 x 4 cells of 32 px
    train, val = build_datasets(run, prepared, [], feature_cache=tmp_path / "features")
    assert (len(train), len(val)) == (2, 0) and not (tmp_path / "features").exists()  # cnn: nothing cached

    inputs, label, target = train[0]
    assert label == 0 and (target == 0).all() and inputs.shape == (1, 128, 128)

    inputs, label, target = train[1]
    record, pre = prepared[1].record, prepared[1].preprocessed
    assert label == 1 and len(record.lesions) == 2
    breast = cell_coverage(pre.breast_mask, 4)
    for circle in record.lesions:
        mapped = pre.geometry.map_circle(circle)
        row, col = int(mapped.y // 32), int(mapped.x // 32)
        assert target[row, col] == 1 and breast[row, col] > 0.5
    assert set(np.unique(target.numpy())) <= {-1, 0, 1}
    assert (target == 1).sum() <= 4
