"""The analysis notebook runs top to bottom on a multirun folder made by the real result writer."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from plmcal import models, pipeline, report

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_methods.ipynb"


def _readout(name: str, final: torch.Tensor, layers: int = 4) -> pipeline.Readout:
    n, k = final.shape
    lens = torch.randn(n, layers, k, generator=torch.Generator().manual_seed(1))
    lens[:, -1] = final
    tensors = {
        "final_option_logits": final,
        "final_logsumexp": torch.logsumexp(final, dim=-1) + 1.0,
        "lens_option_logits": lens,
        "greedy_token": torch.zeros(n, dtype=torch.long),
        "greedy_is_option": torch.ones(n, dtype=torch.bool),
        "n_options": torch.full((n,), k),
    }
    return pipeline.Readout(models.ModelSpec(name=name, source="local", path="."), tensors, list(range(k)))


def _write_sweep(folder: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=generator)
    plm_logits = torch.randn(200, 4, generator=generator) + 1.5 * torch.nn.functional.one_hot(labels, 4)
    polm_logits = 4.0 * plm_logits + torch.randn(200, 4, generator=generator)
    plm, polm = _readout("plm", plm_logits), _readout("polm", polm_logits)
    methods = [
        {"name": "vanilla", "loss": "none", "fit": False},
        {"name": "daca", "loss": "daca", "optimizer": "lbfgs", "lr": 0.5, "epochs": 1, "batch_size": None},
    ]
    for number, method in enumerate(methods):
        result = pipeline.run_calibration(method, plm, polm, labels, {"test_size": 0.7, "seed": 1}, seed=0)
        result |= {"pair": "synthetic", "dataset": "toy", "n_layers": {"plm": 4, "polm": 4}}
        job_dir = folder / f"{number}_toy_{method['name']}"
        job_dir.mkdir(parents=True)
        report.write_job(result, job_dir)


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
