"""Typed model configuration shared by hospitals, coordinator and bundles."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from common.models.cell_classifier import POOLINGS
from common.models.efficientnet_lite import NUM_BLOCKS
from common.run_config import TrainingSettings

MODEL_KINDS: tuple[str, ...] = ("cnn", "effnet_head", "effnet_finetune")
OUTSIDE_LESION: tuple[str, ...] = ("ignore", "normal")


@dataclass(frozen=True)
class ModelConfig:
    """What to build and how its cells are supervised.

    kind:
        "cnn": small GroupNorm CNN, trained end to end on the 1-channel image.
        "effnet_head": frozen EfficientNet-Lite0 features per cell (computed once, cached) + a DP head.
        "effnet_finetune": frozen, BatchNorm-folded blocks `0..finetune_from-1` (output cached), trainable
        GroupNorm blocks `finetune_from..15` + 1x1 head conv, then the same cell head.
    image_size: side of the square preprocessed image the model (or its frozen extractor) sees; inputs of
        another size are resized to it.
    top_k, pooling: how cell scores become image logits (see `cell_classifier`): "classwise" = each class
        scored by its own top_k cell log-probabilities (default), "abnormal" = the logits of the top_k most
        abnormal cells.
    feature_layer: "effnet_head" only: "head" (1280 channels, stride 32) or "block<i>" (output of block i);
        default "block14" (192 channels, stride 32), the best of head / block15 / block14 on mini-MIAS
        (README, "Model quality").
    finetune_from: "effnet_finetune" only: first trainable block (1..15).
    head_hidden: 0 = linear cell head; > 0 = 1x1 conv, GroupNorm, ReLU, 1x1 conv.
    input_norm: "effnet_head" only: standardise each image's feature map over all its cells and channels
        (GroupNorm with one group and no parameters). Per image, so DP-safe; keeps the contrast between an
        image's cells and removes its overall scale.
    cnn_width: channels of the CNN's first stage (doubled per stage, capped at 8x).
    groupnorm_groups: preferred GroupNorm group count (the largest divisor of the channels <= it is used).
    outside_lesion: cells of an abnormal image outside its annotated lesions are "ignore"d (label -1) or
        taken as "normal".
    min_lesion_cover: fraction of a cell a lesion must cover to make the cell a lesion cell (the best
        covered cell of every lesion always counts).
    """

    kind: str = TrainingSettings.model  # the run config's defaults, declared once in common.run_config
    image_size: int = TrainingSettings.image_size
    num_classes: int = 3
    top_k: int = TrainingSettings.top_k
    pooling: str = TrainingSettings.pooling
    feature_layer: str = TrainingSettings.feature_layer
    finetune_from: int = TrainingSettings.finetune_from
    head_hidden: int = TrainingSettings.head_hidden
    input_norm: bool = TrainingSettings.input_norm
    cnn_width: int = 16
    groupnorm_groups: int = 8
    outside_lesion: str = "ignore"
    min_lesion_cover: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; choose one of {MODEL_KINDS}")
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {tuple(POOLINGS)}")
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.feature_layer != "head":
            block = _block_index(self.feature_layer)
            if block is None or not 0 <= block < NUM_BLOCKS:
                raise ValueError(f"feature_layer must be 'head' or 'block0'..'block15', "
                                 f"got {self.feature_layer!r}")
        if not 1 <= self.finetune_from < NUM_BLOCKS:
            raise ValueError(f"finetune_from must be in 1..{NUM_BLOCKS - 1}")
        if self.outside_lesion not in OUTSIDE_LESION:
            raise ValueError(f"outside_lesion must be one of {OUTSIDE_LESION}")
        if not 0 < self.min_lesion_cover <= 1:
            raise ValueError("min_lesion_cover must be in (0, 1]")

    @property
    def extractor_layer(self) -> str | None:
        """The frozen EfficientNet layer whose output is the model input (None: the image itself)."""
        if self.kind == "effnet_head":
            return self.feature_layer
        if self.kind == "effnet_finetune":
            return f"block{self.finetune_from - 1}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**values)


def _block_index(layer: str) -> int | None:
    if layer.startswith("block") and layer[5:].isdigit():
        return int(layer[5:])
    return None
