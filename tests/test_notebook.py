"""The walkthrough notebook: committed without outputs, and it runs from top to bottom on the real mini-MIAS in the
project's own Python (its kernel is this venv's ipykernel; nothing is registered or written under the home folder).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "notebooks" / "mammofl_walkthrough.ipynb"
CELL_TIMEOUT_S = 420  # the simulation cell is the longest: about 2 minutes on 2 cores


def _code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.output_type == "stream")


def test_notebook_is_committed_valid_and_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    cells = _code_cells(notebook)
    assert len(cells) >= 10
    dirty = [i for i, cell in enumerate(cells) if cell.outputs or cell.execution_count is not None]
    assert dirty == [], f"code cells {dirty} carry outputs or execution counts: clear them before committing"
    assert notebook.metadata.kernelspec.name == "python3"
    headings = [line for cell in notebook.cells if cell.cell_type == "markdown"
                for line in cell.source.splitlines() if line.startswith("## ")]
    assert headings == ["## 1. Data: mini-MIAS", "## 2. Model choice",
                        "## 3. A federated simulation with differential privacy", "## 4. Evaluation",
                        "## 5. Explanations", "## 6. Privacy accounting", "## 7. Limitations"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_notebook_runs_in_the_project_kernel(mias_dir, tmp_path, monkeypatch):
    for variable, folder in (("JUPYTER_CONFIG_DIR", "jupyter-config"), ("JUPYTER_DATA_DIR", "jupyter-data"),
                             ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"), ("IPYTHONDIR", "ipython"),
                             ("MPLCONFIGDIR", "matplotlib")):
        monkeypatch.setenv(variable, str(tmp_path / folder))
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")  # the venv's kernel spec before any user-wide one
    monkeypatch.setenv("MINI_MIAS_DIR", str(mias_dir))
    monkeypatch.setenv("MAMMOFL_WALKTHROUGH_RUN", str(tmp_path / "run"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute()

    cells = _code_cells(notebook)
    assert f"python {sys.executable}\n" in _text(cells[0])  # the kernel is this venv's Python
    assert "322 images of 161 patients" in _text(cells[1])
    assert "{'normal': 207, 'benign': 63, 'malignant': 52}" in _text(cells[1])
    document = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert document["status"] == "completed" and len(document["rounds"]) == 12
    assert document["simulation"] == {"preset": "walkthrough", "num-hospitals": 3, "mode": "federated"}
    figures = [output for cell in cells for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert len(figures) >= 9  # preprocessing, rounds, partitions, confusion matrix and ROC, cell maps, 4 methods
    bundle = next(_text(cell) for cell in cells if "AUC malignant from the bundle" in _text(cell))
    assert "score histogram identical to the run's: True" in bundle  # one inference path, the same numbers
    privacy = next(_text(cell) for cell in cells if "Opacus agrees" in _text(cell))
    agreement = [line.split()[4] for line in privacy.splitlines() if line.strip().startswith("partition-")]
    assert agreement == ["True"] * 3, privacy  # each hospital's epsilon recomputed with Opacus
    assert privacy.count("releases: ") == 3
    errors = [output for cell in cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert errors == []
