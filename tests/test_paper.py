"""plmcal.paper: the published CSVs follow the schema, and our runs are printed beside them."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from plmcal import models, paper, pipeline, report

PUBLISHED = sorted(paper.PUBLISHED_DIR.glob("*.csv"))
METHODS = {"vanilla", "cape", "daca", "ts_oracle", "daca_vector", "daca_matrix", "vs_oracle", "ms_oracle", "elicitation", "elicitation_ensemble"}
METRIC_NAMES = {"ece_pct", "mce_pct", "aece_pct", "brier", "nll", "plm_ece_pct"}


def test_every_table_has_file():
    missing = [name for name in paper.TABLES.values() if not (paper.PUBLISHED_DIR / name).exists()]
    assert missing == []


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.name)
def test_published_schema(path):
    rows = paper.load_published(path)
    for row in rows:
        assert row["method"] in METHODS, row
        assert row["metric"] in METRIC_NAMES, row
        assert math.isfinite(float(row["value"])), row
        assert row["std"] == "" or float(row["std"]) >= 0, row
        assert row["source"].startswith("arXiv:"), row


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.name)
def test_published_rows_unique(path):
    rows = paper.load_published(path)
    keys = [(r["model"], r["plm"], r["dataset"], r["method"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))


def test_published_percent_range():
    # ECE-type metrics are printed in percent and Brier in [0, 1]: a misplaced column would break this.
    for path in PUBLISHED:
        for row in paper.load_published(path):
            value = float(row["value"])
            if row["metric"].endswith("_pct"):
                assert 0 <= value <= 100, row
            elif row["metric"] == "brier":
                assert 0 <= value <= 1, row


def _readout(name: str, final: torch.Tensor) -> pipeline.Readout:
    n, k = final.shape
    tensors = {
        "final_option_logits": final,
        "final_logsumexp": torch.logsumexp(final, dim=-1) + 1.0,
        "greedy_is_option": torch.ones(n, dtype=torch.bool),
        "n_options": torch.full((n,), k),
    }
    return pipeline.Readout(models.ModelSpec(name=name, source="local", path="."), tensors, list(range(k)))


def write_runs(folder: Path, pair: str, dataset: str) -> None:
    """Write vanilla and DACA jobs over two splits, as a multirun would, with the real writers."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (120,), generator=generator)
    plm_logits = torch.randn(120, 4, generator=generator) + 1.5 * torch.nn.functional.one_hot(labels, 4)
    polm_logits = 4.0 * plm_logits + torch.randn(120, 4, generator=generator)
    plm, polm = _readout("plm", plm_logits), _readout("polm", polm_logits)
    methods = [{"name": "vanilla", "loss": "none", "fit": False},
               {"name": "daca", "loss": "daca", "optimizer": "lbfgs", "lr": 0.5, "epochs": 1, "batch_size": None}]
    for number, (method, seed) in enumerate((m, s) for m in methods for s in (1, 2)):
        result = pipeline.run_calibration(method, plm, polm, labels, {"test_size": 0.7, "seed": seed}, seed=0)
        result |= {"pair": pair, "dataset": dataset, "prompt": "daca@v1", "split_seed": seed,
                   "overrides": [f"split.seed={seed}", f"method={method['name']}"]}
        report.write_job(result, folder / f"{number}_{dataset}_{method['name']}")


def test_matched_pair_shows_paper(tmp_path):
    write_runs(tmp_path, "qwen3-8b", "mmlu")
    text = paper.paper_table("1", [tmp_path], n_resamples=10)
    vanilla = next(line for line in text.splitlines() if "| qwen3-8b | mmlu | vanilla |" in line)
    daca = next(line for line in text.splitlines() if "| qwen3-8b | mmlu | daca |" in line)
    assert "16.383 ± 0.433" in vanilla
    assert "8.393 ± 0.228" in daca
    assert "published DACA Table 1 as printed" not in text


def test_unmatched_pair_lists_paper(tmp_path):
    write_runs(tmp_path, "gemma3-270m_sft-dpo", "mmlu_slice")
    text = paper.paper_table("1", [tmp_path], n_resamples=10)
    assert "published DACA Table 1 as printed" in text
    assert "| Qwen3-8B | pre-trained counterpart | mmlu | daca | 8.393 ± 0.228 |" in text


def test_ours_mean_std(tmp_path):
    write_runs(tmp_path, "qwen3-8b", "mmlu")
    text = paper.paper_table("1", [tmp_path], n_resamples=10)
    line = next(line for line in text.splitlines() if "| qwen3-8b | mmlu | daca |" in line)
    assert "| 2 |" in line  # two splits
    assert line.count("±") >= 4  # ours and paper, ECE and MCE at least


def test_unmatched_pair_no_paper_columns(tmp_path):
    write_runs(tmp_path, "gemma3-270m_sft-dpo", "mmlu_slice")
    header = next(line for line in paper.paper_table("1", [tmp_path], n_resamples=10).splitlines() if line.startswith("| pair |"))
    assert "paper" not in header


def test_empty_published(tmp_path):
    write_runs(tmp_path, "qwen2.5-7b", "mmlu")
    text = paper.paper_table("dual_align", [tmp_path], n_resamples=10)
    assert "dual_align.csv is empty" in text


def test_unknown_table(tmp_path):
    with pytest.raises(paper.PaperError, match="table '4' is unknown"):
        paper.paper_table("4", [tmp_path])


def test_missing_column(tmp_path):
    path = tmp_path / "bad.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerow(["model", "dataset", "method", "metric", "value"])
    with pytest.raises(paper.PaperError, match="lacks the columns"):
        paper.load_published(path)


def test_export_copies_results(tmp_path):
    runs = tmp_path / "runs"
    write_runs(runs, "qwen3-8b", "mmlu")
    (runs / "0_mmlu_vanilla" / "reliability.png").write_bytes(b"png")
    copied = paper.export_results([runs], tmp_path / "export")
    assert copied == 4
    assert sorted(p.name for p in (tmp_path / "export" / "0_mmlu_vanilla").iterdir()) == ["predictions.npz", "results.json"]
