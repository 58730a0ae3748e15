"""The DP-cost and data-path benchmarks run end to end on tiny inputs (their numbers are published, not asserted)."""

from __future__ import annotations

import json

from bench import data_path, fuzz, grad_sample_modes


def test_dp_cost_separates_steps_from_calls_and_reports_memory():
    row = grad_sample_modes.measure_one("effnet_head", "hooks", image_size=64, batch_size=4, steps=2)
    assert (row["kind"], row["mode"], row["device"]) == ("effnet_head", "hooks", "cpu")
    assert row["seconds_per_step"] >= 0 and row["seconds_per_call"] >= 0 and row["peak_rss_mib"] > 100
    assert grad_sample_modes.dp_config(grad_sample_modes.NO_DP).enabled is False


def test_data_path_fills_both_caches_once(mias_dir, tmp_path):
    result = data_path.measure(mias_dir, 3, tmp_path)
    assert result["images"] == 3 and result["feature_shape"] == [192, 16, 16]
    assert len(list((tmp_path / "preprocessed").rglob("*.npz"))) == 3
    assert all(result[f"{stage}_{phase}_s"] > 0 for stage in ("preprocess", "features")
               for phase in ("first", "cached"))


def test_fuzz_bench_counts_outcomes_and_writes_its_json(tmp_path):
    out = tmp_path / "fuzz.json"
    result = fuzz.main(["--inputs", "60", "--seed", "3", "--out", str(out), "--memory-gb", "0"])
    assert json.loads(out.read_text()) == result
    assert result["inputs"] == 60 and sum(result["outcomes"].values()) == 60
    assert result["uncaught"] == sum(result["uncaught_by_type"].values())
    assert {key.split(":")[0] for key in result["outcomes"]} <= set(fuzz.KINDS)
    assert result["command"] == "python -m bench.fuzz --inputs 60 --seed 3 --out " + str(out) + " --memory-gb 0"
