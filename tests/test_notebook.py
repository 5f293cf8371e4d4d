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
