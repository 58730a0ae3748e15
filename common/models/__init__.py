"""MammoFL models: config, builders, the lesion-aware cell classifier and its data sets.

Every trainable model maps its inputs to image logits (B, 3) in `CLASS_NAMES` order and, with
`return_cells=True`, also to cell logits (B, 3, G, G). See `factory` for each kind's inputs.
"""

from common.models.cell_classifier import CellClassifier, classwise_topk_pool, topk_abnormal_pool
from common.models.cell_targets import UNKNOWN, cell_targets, circle_mask
from common.models.config import MODEL_KINDS, ModelConfig
from common.models.datasets import (
    CellDataset,
    LabelledImage,
    build_dataset,
    compute_inputs,
    mapped_lesion_mask,
)
from common.models.efficientnet_lite import EfficientNetLite0, load_pretrained, weights_path
from common.models.factory import (
    InferenceModel,
    build_feature_extractor,
    build_model,
    cell_grid,
    prepare_inputs,
)
from common.models.feature_extractor import FrozenFeatureExtractor
from common.models.loss import lesion_aware_loss

__all__ = [
    "MODEL_KINDS",
    "UNKNOWN",
    "CellClassifier",
    "CellDataset",
    "EfficientNetLite0",
    "FrozenFeatureExtractor",
    "InferenceModel",
    "LabelledImage",
    "ModelConfig",
    "build_dataset",
    "build_feature_extractor",
    "build_model",
    "cell_grid",
    "cell_targets",
    "circle_mask",
    "classwise_topk_pool",
    "compute_inputs",
    "lesion_aware_loss",
    "load_pretrained",
    "mapped_lesion_mask",
    "prepare_inputs",
    "topk_abnormal_pool",
    "weights_path",
]
