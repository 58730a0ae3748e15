"""`mammofl-sim` end to end: the real CLI in a subprocess on the real mini-MIAS, every mode, the run-directory
contract; bad input refused with a precise message before anything runs; the live round display."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from common.records import CLASS_NAMES
from server.run_directory import RunDirectory
from simulations.progress import RoundTable, RoundWatcher

FINAL_KEYS = ("auc_malignant", "auc_benign_vs_malignant", "accuracy", "precision", "recall", "specificity",
              "f1_macro", "confusion_matrix")
PRIVACY_KEYS = ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "steps")
SMOKE_TEST_IMAGES = 8  # smoke: 16 patients, a quarter held out, stratified by label -> 4 patients, 8 images


def sim(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_smoke(mias_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = sim("run", "--preset", "smoke", "--data-dir", str(mias_dir), "--out", str(out), "--no-live", *extra)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-6000:]}"
    return done


def check_contract(run_dir: Path, *, rounds: int, test_images: int, bundle: bool = True) -> dict:
    """The run-directory contract of the training issue, item 5."""
    document = json.loads((run_dir / "metrics.json").read_text())
    assert document["status"] == "completed" and document["error"] is None
    assert [r["round"] for r in document["rounds"]] == list(range(1, rounds + 1))
    for entry in document["rounds"]:
        assert isinstance(entry["train_loss"], float)
        assert entry["epsilon_max"] > 0
        assert set(FINAL_KEYS) <= set(entry["centralised_eval"])
        assert "federated_eval" in entry
    final = document["final"]
    assert set(FINAL_KEYS) <= set(final)
    assert final["class_names"] == list(CLASS_NAMES)
    matrix = final["confusion_matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    for hospital, privacy in document["privacy"].items():
        assert set(PRIVACY_KEYS) <= set(privacy), hospital
        assert privacy["epsilon"] > 0 and privacy["steps"] > 0
        assert privacy["noise_multiplier"] == 1.0 and privacy["max_grad_norm"] == 1.0
    assert document["config"]["image-size"] == 64 and document["config"]["model"] == "cnn"
    assert {"python", "torch", "flwr", "opacus"} <= set(document["versions"])
    assert (run_dir / "partitions.png").read_bytes()[:4] == b"\x89PNG"
    if bundle:
        assert (run_dir / "model.mammofl").is_file()
        assert sum(sum(row) for row in matrix) == test_images
    return document


def load_bundle_without_flower(bundle: Path) -> dict:
    """Load a bundle in a fresh interpreter (verified against the key the simulation made in its run directory) and
    score it on a blank image; Flower must stay unimported."""
    code = ("import json, sys, torch\n"
            "from common.bundle import load_bundle\n"
            "from common.signing import TrustedKeys\n"
            f"trusted = TrustedKeys.read({str(bundle.parent / 'signing' / 'trusted.pub')!r})\n"
            f"model, meta = load_bundle({str(bundle)!r}, trusted=trusted)\n"
            "x = torch.zeros(2, 1, meta.model_config.image_size, meta.model_config.image_size)\n"
            "print(json.dumps({'shape': list(model(x).shape), 'kind': meta.model_config.kind,\n"
            "                  'classes': list(meta.class_names), 'flwr': 'flwr' in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# ---------------------------------------------------------------- bad input: refused at once, nothing written
@pytest.mark.parametrize("extra, message", [
    (["--set", "lrr=0.1"], "error: unknown key 'lrr' (did you mean 'lr'?): --set takes run config keys or "
                           "'num-hospitals'"),
    (["--set", "lr=fast"], "error: run config 'lr': expected a number, got 'fast'"),
    (["--set", "model=resnet"], "error: run config 'model': must be one of cnn, effnet_head, effnet_finetune; "
                                "got 'resnet'"),
    (["--set", "run-dir=/tmp/elsewhere"], "error: 'run-dir' is set from the command line"),
    (["--mode", "solo"], "error: --mode must be one of federated, centralised, local, got 'solo'"),
    (["--preset", "smok"], "error: unknown preset 'smok' (did you mean 'smoke'?)"),
])
def test_bad_input_is_refused_with_a_precise_message(mias_dir, tmp_path, extra, message):
    out = tmp_path / "run"
    done = sim("run", "--preset", "smoke", "--data-dir", str(mias_dir), "--out", str(out), *extra, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert not out.exists()


def test_missing_data_and_occupied_run_directory_are_refused(mias_dir, tmp_path):
    done = sim("run", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), timeout=60)
    assert done.returncode == 2
    assert f"{tmp_path / 'nowhere'} is not a mini-MIAS folder (no Info.txt)" in done.stderr
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "metrics.json").write_text("{}")
    done = sim("run", "--data-dir", str(mias_dir), "--out", str(occupied), timeout=60)
    assert done.returncode == 2
    assert f"{occupied} already holds a run" in done.stderr
    assert (occupied / "metrics.json").read_text() == "{}"


def test_resume_of_a_folder_that_is_no_run_is_refused(tmp_path):
    done = sim("run", "--resume", str(tmp_path), timeout=60)
    assert done.returncode == 2
    assert f"cannot resume {tmp_path}: simulation.json missing" in done.stderr


# ---------------------------------------------------------------- the live display follows the run directory
def test_round_table_follows_the_run_directory(tmp_path):
    run = RunDirectory.create(tmp_path / "run", config={"num-server-rounds": 2})
    seen: list[int] = []
    console = Console(record=True, width=160, file=open(os.devnull, "w"))
    table = RoundTable(title="smoke", total_rounds=2, console=console)

    def follow(document: dict) -> None:
        seen.append(len(document["rounds"]))
        table(document)

    with table, RoundWatcher(run.path, follow, interval=0.05) as watcher:
        watcher.poll()
        run.record_round({"round": 1, "train_loss": 0.75, "epsilon_max": 1.5,
                          "centralised_eval": {"auc_malignant": 0.625, "accuracy": 0.5},
                          "replies": {"train": {"sampled": 2, "valid": 2}}})
        watcher.poll()
        run.record_round({"round": 2, "train_loss": 0.5, "epsilon_max": 2.25,
                          "federated_eval": {"auc_malignant": 0.875}})
    assert seen[0] == 0 and seen[-1] == 2 and sorted(seen) == seen
    text = console.export_text()
    assert "0.750" in text and "1.50" in text and "0.625" in text and "2/2" in text
    assert "2.25" in text and "0.875" in text and "2/2" in text


# ---------------------------------------------------------------- end to end on mini-MIAS
@pytest.mark.slow
def test_smoke_federation_writes_the_run_directory_contract(mias_dir, tmp_path, console_noise):
    out = tmp_path / "federated"
    done = run_smoke(mias_dir, out)
    # A console a person can read: Flower's round log (--no-live) without the known third-party noise, then
    # the final metrics at the operating point (or arg-max when none was chosen).
    assert "aggregate_train: Received 2 results and 0 failures" in done.stderr
    assert console_noise(done.stdout + done.stderr) == {}
    assert (out / "report.html").is_file() and done.stderr.count("report written") == 1  # once, after the gallery
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert "final metrics, round 1, held-out test set" in done.stdout
    if final.get("operating_point") and final.get("at_operating_point"):
        threshold = final["at_operating_point"]["threshold"]
        assert f"malignant when P(malignant) >= {threshold:.2f}" in done.stdout.replace("\n", " ")
    else:
        assert "decisions at arg-max (this run recorded no operating point)" in done.stdout.replace("\n", " ")
    document = check_contract(out, rounds=1, test_images=SMOKE_TEST_IMAGES)
    assert set(document["privacy"]) == {"partition-0", "partition-1"}
    assert document["final"]["source"] == "centralised-test"
    entry = document["rounds"][0]
    assert entry["replies"]["train"]["valid"] == 2
    assert entry["epsilon_max"] == max(p["epsilon"] for p in document["privacy"].values())
    assert (out / "checkpoints" / "round-0001.npz").is_file()
    assert document["simulation"] == {"preset": "smoke", "num-hospitals": 2, "mode": "federated"}
    audit = document["membership_inference"]  # default gate off: reported, the model released
    assert (audit["members"], audit["non_members"]) == (SMOKE_TEST_IMAGES, SMOKE_TEST_IMAGES)
    assert audit["gate"] == {"max_attack_advantage": 0.0, "enabled": False, "passed": True}
    assert f"membership inference: attack advantage {audit['advantage']:.3f}" in done.stdout
    side = json.loads((out / "simulation.json").read_text())
    assert side["num-hospitals"] == 2 and side["mode"] == "federated" and side["preset"] == "smoke"
    assert [h["n_images"] for h in side["partitions"]["hospitals"]] == [12, 12]
    assert f"model bundle:  {out / 'model.mammofl'}" in done.stdout
    loaded = load_bundle_without_flower(out / "model.mammofl")
    assert loaded == {"shape": [2, 3], "kind": "cnn", "classes": list(CLASS_NAMES), "flwr": False}


@pytest.mark.slow
def test_smoke_centralised_baseline_writes_the_contract(mias_dir, tmp_path):
    out = tmp_path / "centralised"
    run_smoke(mias_dir, out, "--mode", "centralised")
    document = check_contract(out, rounds=1, test_images=SMOKE_TEST_IMAGES)
    assert set(document["privacy"]) == {"pooled"}
    assert document["simulation"] == {"preset": "smoke", "num-hospitals": 2, "mode": "centralised"}
    assert (out / "checkpoints" / "round-0001.npz").is_file()
    assert load_bundle_without_flower(out / "model.mammofl")["shape"] == [2, 3]


@pytest.mark.slow
def test_smoke_local_baseline_writes_the_contract_per_hospital_and_overall(mias_dir, tmp_path):
    out = tmp_path / "local"
    done = run_smoke(mias_dir, out, "--mode", "local", "--set", "dp=false")
    top = json.loads((out / "metrics.json").read_text())
    assert top["status"] == "completed" and [r["round"] for r in top["rounds"]] == [1]
    assert top["simulation"] == {"preset": "smoke", "num-hospitals": 2, "mode": "local"}
    assert set(FINAL_KEYS) <= set(top["final"]) and set(top["final"]["per_hospital"]) == {"partition-0",
                                                                                           "partition-1"}
    for k in (0, 1):
        sub = json.loads((out / f"hospital-{k}" / "metrics.json").read_text())
        assert sub["status"] == "completed" and sub["simulation"]["hospital"] == k
        assert sum(sum(row) for row in sub["final"]["confusion_matrix"]) == SMOKE_TEST_IMAGES
        assert sub["privacy"][f"partition-{k}"]["epsilon"] is None  # DP off: no guarantee, no epsilon
        assert top["final"]["per_hospital"][f"partition-{k}"]["accuracy"] == sub["final"]["accuracy"]
        assert (out / f"hospital-{k}" / "model.mammofl").is_file()
        assert f"model bundle:  {out / f'hospital-{k}' / 'model.mammofl'}" in done.stdout
    audits = top["membership_inference"]["per_hospital"]  # each hospital's model vs its own training split
    assert set(audits) == {"hospital-0", "hospital-1"}
    assert top["membership_inference"]["advantage"] == max(a["advantage"] for a in audits.values())
    mean = sum(top["final"]["per_hospital"][f"partition-{k}"]["accuracy"] for k in (0, 1)) / 2
    assert top["final"]["accuracy"] == pytest.approx(mean)


@pytest.mark.slow
def test_a_federation_that_loses_its_hospitals_fails_loudly_and_resumes(mias_dir, tmp_path):
    """Round 2 would take every hospital past its budget: they refuse, the run exits 1 saying why (Flower alone
    would return normally); resumed with a larger budget, it continues from round 1's checkpoint and epsilon keeps
    growing (the hospitals' ledgers live on their own disks)."""
    out = tmp_path / "interrupted"
    done = sim("run", "--preset", "smoke", "--data-dir", str(mias_dir), "--out", str(out), "--no-live",
               "--set", "num-server-rounds=2", "--set", "sim-max-epsilon=6")
    assert done.returncode == 1, done.stderr[-4000:]
    assert "federated run failed" in done.stderr
    assert "privacy budget would exceed max-epsilon 6" in done.stderr
    failed = json.loads((out / "metrics.json").read_text())
    assert failed["status"] == "failed" and "TooFewReplies" in failed["error"]
    assert [r["round"] for r in failed["rounds"]] == [1]
    first_epsilon = failed["rounds"][0]["epsilon_max"]
    assert 0 < first_epsilon < 6

    resumed = sim("run", "--resume", str(out), "--no-live", "--set", "sim-max-epsilon=10")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    document = json.loads((out / "metrics.json").read_text())
    assert document["status"] == "completed" and [r["round"] for r in document["rounds"]] == [1, 2]
    assert document["resumed"][0]["from_round"] == 1
    assert document["simulation"]["mode"] == "federated"
    assert document["rounds"][1]["epsilon_max"] > first_epsilon
    assert document["config"]["sim-max-epsilon"] == 10.0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "round-0001.npz", "round-0001.npz.sig", "round-0002.npz", "round-0002.npz.sig"]
