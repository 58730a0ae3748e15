"""A hospital's data, from its node config to torch datasets: records -> patient split -> cached preprocessing.

Plain functions, no Flower. Steps:

1. :func:`hospital_records`: a mini-MIAS folder (``Info.txt``), or a folder with a CSV manifest; in simulation the
   node's share of mini-MIAS: patients subset (``sim-max-patients``), held-out test patients removed
   (``sim-test-fraction``), the rest cut into ``num-partitions`` hospitals by ``sim-partition`` (all by patient,
   ``common.partitioning``), and this node takes part ``partition-id``.
2. :func:`split_train_val`: the hospital's own patient-level train/validation split (``common.splits``).
3. :func:`preprocess_records`: the preprocessing shared by every site, cached on the node's disk
   (``client.preprocess_cache``); files that cannot be decoded are skipped and counted.
4. :func:`load_hospital`: all of the above plus the model kind's torch datasets (``common.models``).

Nothing here logs file names, pixels or per-image results: only counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from client.feature_cache import FeatureCache
from client.preprocess_cache import PreprocessCache
from client.readers.base import UnreadableImage
from client.readers.images import read_image
from client.readers.manifest import read_manifest
from client.readers.mias import is_mias_folder, read_mias_records
from common.device import default_device
from common.models import CellDataset, LabelledImage, build_dataset, mapped_lesion_mask
from common.partitioning import holdout_patients, partition_patients, select_patients
from common.preprocessing import PreprocessConfig, Preprocessed
from common.records import ImageRecord
from common.run_config import NodeConfig, RunConfig
from common.splits import split_records

log = logging.getLogger(__name__)


class HospitalDataError(ValueError):
    """The node's data cannot be used (what is wrong, never which patient)."""


@dataclass(frozen=True)
class PreparedImage:
    """One usable image: its record (label, lesions in original coordinates) and its preprocessed pixels."""

    record: ImageRecord
    preprocessed: Preprocessed


@dataclass(frozen=True)
class HospitalData:
    """A hospital's training and validation data, ready for the model kind it was built for."""

    train: CellDataset  # (inputs, label, cell_target) items
    val: CellDataset  # may have length 0 on a tiny site
    n_train_images: int
    n_val_images: int
    n_patients: int
    n_skipped: int  # files that could not be decoded
    val_images: tuple[LabelledImage, ...] = ()  # the validation split's images and annotations (explanations)


def hospital_records(node: NodeConfig, run: RunConfig) -> list[ImageRecord]:
    """The labelled images this node may use (all its data; split later)."""
    if node.is_simulation:
        return simulation_partition(node.data_dir, run, partition_id=node.partition_id,
                                    num_partitions=node.num_partitions)
    if node.manifest is not None:
        records = read_manifest(node.manifest, root=node.data_dir)  # image paths stay inside data-dir
    elif is_mias_folder(node.data_dir):
        records = read_mias_records(node.data_dir)
    else:
        raise HospitalDataError(f"{node.data_dir} is not a mini-MIAS folder (no Info.txt with mdbNNN images) and "
                                f"node config 'manifest' is not set")
    labelled = [r for r in records if r.label is not None]
    if not labelled:
        raise HospitalDataError("the node's data has no labelled image")
    return labelled


def simulation_pool(data_dir: Path, run: RunConfig) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(patients shared out to the virtual hospitals, held-out test patients) of the simulation's data set."""
    records = select_patients(read_mias_records(data_dir), max_patients=run.sim_max_patients, seed=run.seed)
    return holdout_patients(records, fraction=run.sim_test_fraction, seed=run.seed)


def simulation_partition(data_dir: Path, run: RunConfig, *, partition_id: int,
                         num_partitions: int) -> list[ImageRecord]:
    """The records of virtual hospital `partition_id` of `num_partitions`."""
    pool, _ = simulation_pool(data_dir, run)
    parts = partition_patients(pool, num_partitions=num_partitions, scheme=run.sim_partition, seed=run.seed,
                               alpha=run.sim_dirichlet_alpha)
    return parts[partition_id]


def simulation_test_records(run: RunConfig) -> list[ImageRecord]:
    """The held-out test patients of a simulation (for the coordinator's centralised evaluation)."""
    if not run.sim_data_dir:
        raise HospitalDataError("run config 'sim-data-dir' is required for the centralised test set")
    _, test = simulation_pool(Path(run.sim_data_dir).expanduser().resolve(), run)
    return test


def split_train_val(records: list[ImageRecord], *, val_fraction: float,
                    seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Patient-level train/validation split of one hospital (val may be empty for a one-patient site)."""
    if val_fraction <= 0 or len({r.patient_id for r in records}) < 2:
        return list(records), []
    parts = split_records(records, fractions=(1.0 - val_fraction, val_fraction, 0.0), seed=seed)
    return parts["train"], parts["val"]


def preprocess_records(records: list[ImageRecord], *, cache: PreprocessCache,
                       config: PreprocessConfig) -> tuple[list[PreparedImage], int]:
    """Preprocessed images (cached) and the number of files skipped because they could not be decoded."""
    prepared, skipped = [], 0
    for record in records:
        try:
            prepared.append(PreparedImage(record, cache.get_or_compute(record, config, decode=read_image)))
        except UnreadableImage:
            skipped += 1
    if skipped:
        log.warning("%d of %d images could not be decoded and were skipped", skipped, len(records))
    return prepared, skipped


def load_hospital(node: NodeConfig, run: RunConfig) -> HospitalData:
    """Records -> patient split -> cached preprocessing -> the model kind's datasets."""
    records = hospital_records(node, run)
    train_records, val_records = split_train_val(records, val_fraction=run.val_fraction, seed=run.seed)
    cache = PreprocessCache(node.cache_dir / "preprocessed")
    config = run.preprocess_config()
    train, skipped_train = preprocess_records(train_records, cache=cache, config=config)
    val, skipped_val = preprocess_records(val_records, cache=cache, config=config)
    if not train:
        raise HospitalDataError("no usable training image on this node")
    train_set, val_set = build_datasets(run, train, val, feature_cache=node.cache_dir / "features")
    log.info("hospital data: %d train / %d validation images, %d patients", len(train), len(val),
             len({r.patient_id for r in records}))
    return HospitalData(train=train_set, val=val_set, n_train_images=len(train), n_val_images=len(val),
                        n_patients=len({r.patient_id for r in records}), n_skipped=skipped_train + skipped_val,
                        val_images=tuple(labelled_image(p) for p in val))


def held_out_test_set(run: RunConfig, *, cache_dir: Path):
    """The simulation's held-out test set as the model kind's dataset (coordinator side of a simulation)."""
    cache = PreprocessCache(cache_dir / "preprocessed")
    prepared, _ = preprocess_records(simulation_test_records(run), cache=cache, config=run.preprocess_config())
    if not prepared:
        raise HospitalDataError("the held-out test set is empty: raise 'sim-test-fraction'")
    _, test = build_datasets(run, [], prepared, feature_cache=cache_dir / "features")
    return test


def build_datasets(run: RunConfig, train: list[PreparedImage], val: list[PreparedImage], *,
                   feature_cache: Path) -> tuple[CellDataset, CellDataset]:
    """Torch datasets for the run's model kind: (inputs, label, cell target) items.

    Lesion circles and ROI masks are mapped into the preprocessed frame; inputs of the EfficientNet kinds are
    frozen features, computed once per image and kept in the node's feature cache.
    """
    config = run.model_config()
    cache = FeatureCache(feature_cache)
    out = []
    for prepared in (train, val):
        items = [labelled_image(p) for p in prepared]
        inputs = cache.inputs([item.image for item in items], config, device=default_device())
        out.append(build_dataset(items, config, inputs=inputs))
    return out[0], out[1]


def labelled_image(prepared: PreparedImage) -> LabelledImage:
    """The supervision of one image in the preprocessed frame (label, lesion pixels, breast pixels)."""
    record, pre = prepared.record, prepared.preprocessed
    roi = read_image(record.roi_mask).pixels > 0.5 if record.roi_mask is not None else None
    lesion_mask = mapped_lesion_mask(pre.geometry, record.lesions, roi)
    return LabelledImage(image=pre.image, label=record.label_index, lesion_mask=lesion_mask,
                         breast_mask=pre.breast_mask)
