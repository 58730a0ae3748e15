"""Explanations of a trained MammoFL model with Captum, their sanity check and their localisation scores.

Pure (torch, captum, numpy, scipy; no Flower). Every method maps a batch to (B, S, S) maps in the preprocessed
image frame (draw them on the original image with `common.inference.Prediction.on_original`) and explains the
image logit of one class (malignant by default, or one class per image):

    model = explainable(inference_model)           # eval-mode copy, no Opacus hooks; the original is untouched
    maps = explain("grad_cam", model, images)      # or grad_cam(model, images), integrated_gradients(...), ...

Grad-CAM and the cell-score map are also computable from cached frozen features: pass the trained
`CellClassifier` (`explainable(inference_model.model)`) with the features and `size=S`. See `registry` for the
methods, `randomisation` for the sanity check and `localisation` for the pointing game and attribution mass.
"""

from common.explanations.cell_scores import cell_score_map
from common.explanations.explainable import MALIGNANT, explainable
from common.explanations.grad_cam import grad_cam
from common.explanations.integrated_gradients import integrated_gradients
from common.explanations.localisation import mass_inside, pointing_game, random_baseline
from common.explanations.occlusion import occlusion
from common.explanations.randomisation import model_randomisation_check, randomised_head, rank_correlation
from common.explanations.registry import METHODS, explain

__all__ = [
    "MALIGNANT",
    "METHODS",
    "cell_score_map",
    "explain",
    "explainable",
    "grad_cam",
    "integrated_gradients",
    "mass_inside",
    "model_randomisation_check",
    "occlusion",
    "pointing_game",
    "random_baseline",
    "randomised_head",
    "rank_correlation",
]
