"""diagnosis.py on synthetic read-outs: the numbers against direct computations, and the files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from helpers import synthetic_pair, synthetic_readout
from plmcal import diagnosis, losses, pipeline

LAYERS = 4


@pytest.fixture(scope="module")
def pair():
    return synthetic_pair(n=120)


@pytest.fixture(scope="module")
def result(pair):
    plm, polm, labels = pair
    return diagnosis.diagnose(plm, polm, labels)


def test_counts_cover_all(result):
    counts = result["summary"]["counts"]
    assert counts["confidence_drift"] + counts["process_drift"] == 120


def test_inflated_subset(result):
    counts = result["summary"]["counts"]
    assert 0 <= counts["confidence_drift_inflated"] <= counts["confidence_drift"]


def test_pdl_histogram_total(result):
    histogram = result["summary"]["pdl_histogram"]
    assert sum(histogram["agree"]) + sum(histogram["disagree"]) == 120


def test_pdl_never_first_layer(result):
    # l* is taken over layers 2..L (1-based), so layer 1 never contains a question.
    histogram = result["summary"]["pdl_histogram"]
    assert histogram["agree"][0] == histogram["disagree"][0] == 0


def test_jsd_mean_direct(pair, result):
    plm, polm, _ = pair
    jsd = losses.layer_divergence(plm.tensors["lens_option_logits"], polm.tensors["lens_option_logits"])
    agree = losses.agreement(plm.tensors["final_option_logits"], polm.tensors["final_option_logits"])
    assert_close(torch.tensor(result["summary"]["jsd"]["agree"]["mean"]), jsd[agree].mean(dim=0), rtol=1e-5, atol=1e-7)


def test_ise_direct(pair, result):
    # ISE of question 0: the mean PoLM entropy over the layers from its PDL on.
    _, polm, _ = pair
    entropy = losses.entropy(losses.masked_log_softmax(polm.tensors["lens_option_logits"][0]))  # (L,)
    start = int(result["arrays"]["pdl"][0]) - 1
    assert result["arrays"]["ise_polm"][0] == pytest.approx(float(entropy[start:].mean()), rel=1e-5)


def test_accuracy_by_regime(result):
    accuracy = result["summary"]["accuracy"]
    assert 0.0 <= accuracy["agree"]["plm"] <= 1.0


def test_identical_models_zero():
    logits = torch.randn(30, 4, generator=torch.Generator().manual_seed(5))
    same = synthetic_readout("same", logits)
    found = diagnosis.diagnose(same, same)
    assert found["summary"]["counts"]["process_drift"] == 0
    assert max(found["summary"]["jsd"]["agree"]["mean"]) == pytest.approx(0.0, abs=1e-6)
    assert found["summary"]["ise"]["agree"]["mean_sq_diff"] == pytest.approx(0.0, abs=1e-10)


def test_empty_regime_nan():
    logits = torch.randn(30, 4, generator=torch.Generator().manual_seed(5))
    same = synthetic_readout("same", logits)
    summary = diagnosis.diagnose(same, same)["summary"]
    assert np.isnan(summary["jsd"]["disagree"]["mean"]).all()


def test_unequal_depth_raises():
    logits = torch.randn(10, 4)
    with pytest.raises(pipeline.PipelineError, match="equal depth"):
        diagnosis.diagnose(synthetic_readout("a", logits, layers=3), synthetic_readout("b", logits, layers=5))


def test_no_lens_raises():
    plm = synthetic_readout("a", torch.randn(10, 4))
    bare = pipeline.Readout(plm.spec, {k: v for k, v in plm.tensors.items() if not k.startswith("lens")}, plm.option_ids)
    with pytest.raises(ValueError, match="readout.lens=true"):
        diagnosis.diagnose(bare, bare)


def test_full_vocab_support(pair):
    # Grouping rule of entropy: H(options + rest) = h(r) + (1 - r) H(options renormalised), where
    # r is the rest's mass. The synthetic read-out puts r = 1 - 1/e outside the options on every layer.
    plm, polm, _ = pair
    found = diagnosis.diagnose(plm, polm, support="full_vocab")["arrays"]["entropy_polm"]
    options_only = diagnosis.diagnose(plm, polm)["arrays"]["entropy_polm"]
    rest = 1.0 - np.exp(-1.0)
    binary = -(rest * np.log(rest) + (1 - rest) * np.log(1 - rest))
    np.testing.assert_allclose(found, binary + (1 - rest) * options_only, rtol=1e-4)


def test_topk_support_needs_readout(pair):
    plm, polm, _ = pair
    with pytest.raises(pipeline.PipelineError, match="readout.topk"):
        diagnosis.diagnose(plm, polm, support="topk")


def test_files_written(result, tmp_path):
    paths = diagnosis.write_diagnosis(result, tmp_path, title="(toy)")
    assert sorted(paths) == sorted(diagnosis.FIGURES)
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "diagnosis.json").read_text())["n_layers"] == LAYERS
    assert np.load(tmp_path / "diagnosis.npz")["jsd"].shape == (120, LAYERS)


def test_scalar_metrics(result):
    flat = diagnosis.scalar_metrics(result["summary"])
    assert flat["diag/process_drift"] == result["summary"]["counts"]["process_drift"]
    assert all(key.startswith("diag/") for key in flat)


class RecordingRun:
    """Stands in for a wandb run: keeps what log() receives and the summary."""

    def __init__(self):
        self.logged: dict = {}
        self.summary: dict = {}

    def log(self, payload: dict) -> None:
        self.logged |= payload


def test_wandb_payload(result, pair, tmp_path):
    # The run's W&B payload carries the diagnosis figures as images and its scalars under diag/.
    import wandb

    from helpers import DACA_LBFGS
    from plmcal import report
    from plmcal.run import log_to_wandb

    plm, polm, labels = pair
    job = pipeline.run_calibration(DACA_LBFGS, plm, polm, labels, {"test_size": 0.7, "seed": 1}, seed=0)
    job |= {"pair": "synthetic", "dataset": "toy", "prompt": "toy@v1", "split_seed": 1, "n_layers": {"plm": LAYERS, "polm": LAYERS}}
    report.write_job(job, tmp_path)
    paths = diagnosis.write_diagnosis(result, tmp_path / "diagnosis")
    run = RecordingRun()
    log_to_wandb(run, job, tmp_path, paths)
    assert all(isinstance(run.logged[f"diagnosis/{name}"], wandb.Image) for name in diagnosis.FIGURES)
    assert run.summary["diag/process_drift"] == result["summary"]["counts"]["process_drift"]
    assert "test/ece" in run.summary
