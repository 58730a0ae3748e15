"""A hospital's preprocessed images -> the model kind's torch data set `(inputs, label, cell_target)`.

Lesion annotations (mini-MIAS circles, manifest circles or ROI mask files) are mapped into the
preprocessed frame with the image's `Geometry`; the breast mask comes from preprocessing. Frozen
features come from the node's `FeatureCache`, so they are computed once per hospital.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from client.feature_cache import FeatureCache
from client.readers.images import read_image
from common.models import CellDataset, LabelledImage, ModelConfig, build_dataset, mapped_lesion_mask
from common.preprocessing import Preprocessed
from common.records import ImageRecord


def labelled_image(record: ImageRecord, preprocessed: Preprocessed) -> LabelledImage:
    """The image, its label and its lesion/breast masks in the preprocessed frame.

    An ROI mask file is read like an image; pixels above half of full scale are lesion pixels.
    """
    roi = None
    if record.roi_mask is not None:
        roi = read_image(record.roi_mask).pixels > 0.5
    lesion = mapped_lesion_mask(preprocessed.geometry, record.lesions, roi)
    return LabelledImage(image=preprocessed.image, label=record.label_index, lesion_mask=lesion,
                         breast_mask=preprocessed.breast_mask)


def cell_dataset(images: Sequence[tuple[ImageRecord, Preprocessed]], config: ModelConfig, *,
                 cache: FeatureCache, device: torch.device | str = "cpu") -> CellDataset:
    """The data set of `config.kind` for labelled (record, preprocessed) pairs, inputs from `cache`."""
    items = [labelled_image(record, pre) for record, pre in images]
    if not items:
        return build_dataset([], config, inputs=torch.empty(0))
    inputs = cache.inputs([np.asarray(item.image) for item in items], config, device=device)
    return build_dataset(items, config, inputs=inputs)
