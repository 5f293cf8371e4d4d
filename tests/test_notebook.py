"""The analysis notebook runs top to bottom on a multirun folder made by the real result writer."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import DACA_LBFGS, VANILLA, write_synthetic_sweep

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_methods.ipynb"


def _write_sweep(folder: Path) -> None:
    write_synthetic_sweep(folder, [VANILLA, DACA_LBFGS], seeds=[1])


@pytest.mark.slow
def test_compare_notebook_executes(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    _write_sweep(sweep)
    monkeypatch.setenv("PLMCAL_SWEEP_DIR", str(sweep))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = "".join(
        str(output.get("text", "")) for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    )
    assert "2 jobs in" in outputs
    assert "daca  T=" in outputs


DIAGNOSIS = NOTEBOOK.parent / "diagnosis.ipynb"


@pytest.mark.slow
def test_diagnosis_notebook_executes(embedded_cache, monkeypatch):
    # The real embedded same-family pair on 24 ARC-Easy questions (read out once, then cached).
    overrides = f"dataset=arc_easy dataset.limit=24 prompt=daca_spaced paths.cache_dir={embedded_cache}"
    monkeypatch.setenv("PLMCAL_DIAG_OVERRIDES", overrides)
    notebook = nbformat.read(DIAGNOSIS, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(DIAGNOSIS.parent)}})
    client.execute()
    texts = [str(output.get("text", "")) for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert "24 questions, 18 layers" in "".join(texts)
    assert "process drift (disagree):" in "".join(texts)
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert len(images) == 4
