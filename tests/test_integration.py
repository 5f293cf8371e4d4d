"""run.run_job end to end on the real embedded models (slow, but run by default).

The cross-family pair (Gemma-3-270M PLM + SmolLM2-135M-Instruct PoLM) always runs. The same-family
pair needs the PoLM adapter that experiments/post_train.py writes, so its test skips without it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import CROSS_PAIR, DEFAULT_THREADS, SAME_PAIR, compose_config, torch_threads
from plmcal.run import run_job

pytestmark = pytest.mark.slow

N_QUESTIONS = 12
RESULT_FILES = ["results.json", "results.md", "results.csv", "reliability.png"]


def job_config(pair: str, method: str, output_dir: Path, cache_dir: Path, *extra: str, limit: int = N_QUESTIONS):
    return compose_config(
        [
            f"pair={pair}",
            "dataset=arc_easy",
            f"dataset.limit={limit}",
            f"method={method}",
            "logger=none",
            f"paths.output_dir={output_dir}",
            f"paths.cache_dir={cache_dir}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def cross_run(embedded_cache, tmp_path_factory) -> tuple[dict, Path]:
    run_dir = tmp_path_factory.mktemp("daca-run")
    cfg = job_config(CROSS_PAIR, "daca", tmp_path_factory.mktemp("outputs"), embedded_cache)
    with torch_threads(DEFAULT_THREADS):  # the real models' read-outs, unless the CLI test cached them
        return run_job(cfg, run_dir), run_dir


@pytest.mark.parametrize("name", RESULT_FILES)
def test_cross_files(name, cross_run):
    _, run_dir = cross_run
    assert (run_dir / name).stat().st_size > 0


def test_cross_json(cross_run):
    result, run_dir = cross_run
    assert json.loads((run_dir / "results.json").read_text())["temperature"] == result["temperature"]


def test_cross_method(cross_run):
    assert cross_run[0]["method"] == "daca"


def test_cross_temperature_finite(cross_run):
    assert math.isfinite(cross_run[0]["temperature"])


def test_cross_temperature_positive(cross_run):
    assert cross_run[0]["temperature"] > 0


def test_cross_split(cross_run):
    result = cross_run[0]
    assert (result["n_calibration"], result["n_test"]) == (3, 9)  # ceil(0.7 * 12) = 9 test questions


def test_cross_depths(cross_run):
    assert cross_run[0]["n_layers"] == {"plm": 18, "polm": 30}


def test_cross_accuracy_kept(cross_run):
    # Temperature scaling never changes a prediction, so accuracy is the same before and after.
    result = cross_run[0]
    assert result["test"]["accuracy"] == result["test_uncalibrated"]["accuracy"]


def test_cross_markdown(cross_run):
    header = (cross_run[1] / "results.md").read_text().splitlines()[0]
    assert "ECE %" in header


def test_cross_csv_rows(cross_run):
    with (cross_run[1] / "results.csv").open() as handle:
        rows = list(csv.reader(handle))
    method_column = rows[0].index("method")
    assert [row[method_column] for row in rows[1:]] == ["uncalibrated PoLM", "daca", "PLM (reference)"]


def test_cross_png(cross_run):
    assert (cross_run[1] / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cross_cached(cross_run, embedded_cache, tmp_path, monkeypatch):
    # A second job on the same pair and questions reads both models from the cache: no model loads.
    from plmcal import models

    def no_load(*args, **kwargs):
        raise AssertionError("models.load was called although the read-outs are cached")

    monkeypatch.setattr(models, "load", no_load)
    result = run_job(job_config(CROSS_PAIR, "ts_oracle", tmp_path, embedded_cache), tmp_path)
    assert result["method"] == "ts_oracle"


def test_same_family_dual_align(embedded_cache, tmp_path):
    # The spaced prompt, as in the main job: with the official trailing-space prompt the two
    # embedded models never agree on an answer. 30 questions leave 9 for calibration; 20 epochs keep
    # the fit short (test_fit covers the full 400-epoch loop).
    cfg = job_config(SAME_PAIR, "dual_align", tmp_path, embedded_cache, "method.epochs=20", "prompt=daca_spaced", limit=30)
    adapter = Path(OmegaConf.to_container(cfg.pair, resolve=True)["polm"]["adapter"])
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (adapter / name).exists()]
    if missing:
        pytest.skip(f"PoLM adapter {adapter} lacks {', '.join(missing)}; run experiments/post_train.py to build it")
    with torch_threads(DEFAULT_THREADS):
        result = run_job(cfg, tmp_path)
    assert result["n_layers"] == {"plm": 18, "polm": 18}
    assert [name for name in RESULT_FILES if not (tmp_path / name).exists()] == []
