"""The membership-inference benchmark runs end to end on tiny synthetic inputs (its numbers are published, not
asserted) and reports exactly what the attacks give on each fold's model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from bench import membership
from bench import model_quality as mq
from common.models import CellDataset
from simulations.presets import resolve

pytestmark = [pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
              pytest.mark.filterwarnings("ignore:Using a non-full backward hook")]


@dataclass(frozen=True)
class _Record:
    patient_id: str
    label: str


@dataclass(frozen=True)
class _Prepared:
    record: _Record


def test_membership_bench_row_is_the_mean_of_its_fold_audits():
    torch.set_num_threads(1)
    n = 48
    prepared = [_Prepared(_Record(f"p{i // 2:03d}", ("normal", "benign", "malignant")[i // 2 % 3]))
                for i in range(n)]
    g = torch.Generator().manual_seed(0)
    data = CellDataset(torch.randn(n, 192, 16, 16, generator=g).half(), torch.tensor([i // 2 % 3 for i in range(n)]),
                       torch.randint(-1, 3, (n, 16, 16), generator=g))
    schedule = mq.Schedule(rounds=2, steps_per_epoch=2)
    model_config = resolve("demo").run.model_config()
    rows = membership.rows_for([1.0, 8.0], hospitals=2, cell_loss_weight=10.0)
    assert [(r.mode, r.epsilon) for r in rows] == [("fednodp", None), ("distributed", 8.0), ("distributed", 1.0)]
    result = membership.evaluate(rows[0], schedule, model_config, data, prepared, k=2, seeds=[0])
    assert result["noise_multiplier_sum"] is None and "epsilon_sum" not in result  # no DP (calibration: slow)
    audits = []
    for fold, (train_idx, test_idx) in enumerate(mq.folds_for(prepared, k=2, seed=0)):
        model, _ = mq.train_federated(rows[0], schedule, None, model_config, data, prepared, train_idx,
                                      mq.fold_seed(0, fold))
        audits.append(membership.fold_audit(model, data, train_idx, test_idx, mq.fold_seed(0, fold)))
    assert result["members_per_fold"] == [min(a.members for a in audits), max(a.members for a in audits)]
    for column, name in membership.ATTACK_COLUMNS:
        attacks = [next(x for x in a.attacks if x.name == name) for a in audits]
        assert result[f"{column}_advantage"] == [pytest.approx(np.mean([x.advantage for x in attacks]))]
        assert result[f"{column}_auc"] == [pytest.approx(np.mean([x.auc for x in attacks]))]
    assert "name" in result and membership.format_row(result).startswith(result["name"][:40])


def test_rows_merge_seed_by_seed_and_tabulate(tmp_path, capsys):
    first = {"name": "r", "seeds": [0], "loss_advantage": [0.1], "loss_auc": [0.5], "lr_advantage": [0.2],
             "lr_auc": [0.6], "chance_advantage_95": [0.2], "members_per_fold": [60, 66], "seconds": 2.0,
             "epsilon_sum": 3.0, "noise_multiplier_sum": 3.5}
    second = {**first, "seeds": [1], "loss_advantage": [0.3], "members_per_fold": [58, 64], "seconds": 3.0}
    both = membership.merged(membership.merged(None, first), second)
    assert both["seeds"] == [0, 1] and both["loss_advantage"] == [0.1, 0.3] and both["lr_auc"] == [0.6, 0.6]
    assert both["members_per_fold"] == [58, 66] and both["seconds"] == 5.0 and both["epsilon_sum"] == 3.0
    path = tmp_path / "membership.json"
    path.write_text(__import__("json").dumps({"settings": {"folds": 5}, "rows": [both]}))
    membership.main(["--tabulate", str(path)])
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.split()[:4] == ["r", "3.00", "0.200", "±"] and "0.100" in line  # mean 0.2, s.e. 0.1
