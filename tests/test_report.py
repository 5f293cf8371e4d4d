"""report.py and the multirun callback on results from synthetic read-outs (no model)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

from helpers import compose_config, pair_logits
from plmcal import pipeline, report
from plmcal.callbacks import ComparisonTable
from plmcal.models import ModelSpec

HEADERS = [name for name, _, _ in report.COLUMNS]
METHOD_COLUMN = HEADERS.index("method")
ECE_COLUMN = HEADERS.index("ECE %")


def readout(name: str, final: torch.Tensor) -> pipeline.Readout:
    n, k = final.shape
    tensors = {
        "final_option_logits": final,
        "final_logsumexp": torch.logsumexp(final, -1) + 0.5,
        "n_options": torch.full((n,), k),
        "greedy_is_option": torch.ones(n, dtype=torch.bool),
    }
    return pipeline.Readout(ModelSpec(name=name, source="local", path="/nowhere"), tensors, list(range(k)))


@pytest.fixture(scope="module")
def results() -> list[dict]:
    plm, polm = pair_logits(30, n=60)
    labels = plm.argmax(1)
    out = []
    for name in ("ts_oracle", "vanilla", "daca"):
        method = OmegaConf.to_container(compose_config([f"method={name}"]).method, resolve=True)
        result = pipeline.run_calibration(method, readout("plm", plm), readout("polm", polm), labels, {"test_size": 0.7, "seed": 1}, seed=0)
        out.append(result | {"pair": "toy-pair", "dataset": "toy"})
    return out


@pytest.mark.parametrize("name", ["results.json", "results.md", "results.csv", "reliability.png"])
def test_write_job_new_folder(name, results, tmp_path):
    folder = tmp_path / "not" / "yet" / "there"
    report.write_job(results[0], folder)
    assert (folder / name).exists()


def test_job_rows(results, tmp_path):
    report.write_job(results[2], tmp_path)
    with (tmp_path / "results.csv").open() as handle:
        methods = [row[METHOD_COLUMN] for row in list(csv.reader(handle))[1:]]
    assert methods == ["uncalibrated PoLM", "daca", "PLM (reference)"]


def test_markdown_header(results):
    assert report.markdown_table(results).splitlines()[0].startswith("| pair | dataset | prompt | method | T | ECE % |")


def test_percent_scale(results):
    row = report.table_rows([results[0]])[0]
    assert row[ECE_COLUMN] == f"{100 * results[0]['test']['ece']:.2f}"


def test_collect(results, tmp_path):
    for i, result in enumerate(results):
        report.write_job(result, tmp_path / str(i))
    assert [r["method"] for r in report.collect(tmp_path)] == ["ts_oracle", "vanilla", "daca"]


def test_collect_skips_broken(results, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text("{broken")
    report.write_job(results[0], tmp_path / "b")
    assert len(report.collect(tmp_path)) == 1


def test_callback_order(results, tmp_path, capsys):
    # The comparison table lists the baselines first and the labelled oracle last.
    for i, result in enumerate(results):
        report.write_job(result, tmp_path / str(i))
    ComparisonTable().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    with (tmp_path / "comparison.csv").open() as handle:
        methods = [row[METHOD_COLUMN] for row in list(csv.reader(handle))[1:]]
    assert methods == ["vanilla", "daca", "ts_oracle"]


def test_vanilla_temperature_one(results):
    assert results[1]["temperature"] == 1.0


def test_accuracy_unchanged(results):
    assert results[2]["test"]["accuracy"] == results[2]["test_uncalibrated"]["accuracy"]
