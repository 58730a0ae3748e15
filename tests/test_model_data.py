"""Real mini-MIAS images -> preprocessed -> cell data set: lesion circles land on the right cells."""

from __future__ import annotations

import numpy as np

from client.feature_cache import FeatureCache
from client.model_data import cell_dataset
from client.readers.images import read_image
from client.readers.mias import read_mias_records
from common.models import ModelConfig
from common.models.cell_targets import cell_coverage
from common.preprocessing import PreprocessConfig, preprocess


def test_mias_lesions_become_lesion_cells(mias_dir, tmp_path):
    records = {r.path.stem: r for r in read_mias_records(mias_dir)}
    pre_config = PreprocessConfig(size=128)
    pairs = []
    for name in ("mdb003", "mdb005"):  # normal; benign with two lesion circles
        record = records[name]
        pairs.append((record, preprocess(read_image(record.path).pixels, breast_side=record.breast_side,
                                         config=pre_config)))
    config = ModelConfig(kind="cnn", image_size=128)  # 4 x 4 cells of 32 px
    dataset = cell_dataset(pairs, config, cache=FeatureCache(tmp_path))
    assert len(dataset) == 2 and not list(tmp_path.iterdir())  # cnn: nothing cached

    inputs, label, target = dataset[0]
    assert label == 0 and (target == 0).all() and inputs.shape == (1, 128, 128)

    inputs, label, target = dataset[1]
    record, pre = pairs[1]
    assert label == 1 and len(record.lesions) == 2
    breast = cell_coverage(pre.breast_mask, 4)
    for circle in record.lesions:
        mapped = pre.geometry.map_circle(circle)
        row, col = int(mapped.y // 32), int(mapped.x // 32)
        assert target[row, col] == 1  # the cell holding the lesion centre is a lesion cell
        assert breast[row, col] > 0.5  # and it lies in the breast
    assert set(np.unique(target.numpy())) <= {-1, 0, 1}
    assert (target == 1).sum() <= 4
