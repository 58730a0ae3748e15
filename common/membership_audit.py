"""Membership-inference audit of a model on data whose membership is known (torch side of
``common.membership_inference``).

Who can run it: whoever holds both training examples (members) and comparable examples the model never trained on
(non-members). In simulation that is the simulation process (the virtual hospitals' training splits and the
held-out test set: ``simulations.membership_audit``). In a deployment the coordinator holds no member data, so
there is no coordinator-side audit and nothing about it crosses the wire; a hospital can audit a released model
on its own data, e.g. ``audit_model(model, hospital.train, hospital.val, seed=0)`` with the splits of
``client.hospital_data.load_hospital`` (its validation split was never trained on). Per-example losses stay in
this process's memory; only the aggregate :class:`~common.membership_inference.MembershipAudit` is returned.
"""

from __future__ import annotations

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from common.evaluation import predict_proba
from common.membership_inference import MembershipAudit, audit, cross_entropy_losses


def example_losses(model: nn.Module, dataset: Dataset, *, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(per-example image cross-entropy, label) of `model` on `dataset` ((inputs, label, cell target) items)."""
    labels, probabilities = predict_proba(model, dataset, device=device)
    if len(labels) == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return cross_entropy_losses(probabilities, labels), labels


def audit_model(model: nn.Module, members: Dataset, non_members: Dataset, *, seed: int,
                device: str = "cpu") -> MembershipAudit:
    """Both attacks of ``common.membership_inference`` on `model`: `members` (trained on) vs `non_members`."""
    member_losses, member_labels = example_losses(model, members, device=device)
    non_member_losses, non_member_labels = example_losses(model, non_members, device=device)
    return audit(member_losses, member_labels, non_member_losses, non_member_labels, seed=seed)
