"""metrics.py against reference implementations (netcal, sklearn, torchmetrics) and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from netcal.metrics import ECE, MCE
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.functional.classification import binary_calibration_error

from plmcal import metrics

N_BINS = 10


def random_probs(seed: int, n: int = 500, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float64 probabilities of varied sharpness and (N,) labels correlated with them."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=generator, dtype=torch.float64) * torch.rand(n, 1, generator=generator, dtype=torch.float64) * 4
    probs = torch.softmax(logits, dim=-1)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return probs, sampled


def top_label(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    confidence, prediction = probs.max(dim=-1)
    return confidence, (prediction == labels).double()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_netcal(seed):
    confidence, correct = top_label(*random_probs(seed))
    expected = ECE(bins=N_BINS).measure(confidence.numpy(), correct.numpy())
    assert metrics.ece(confidence, correct, N_BINS) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mce_netcal(seed):
    confidence, correct = top_label(*random_probs(seed))
    expected = MCE(bins=N_BINS).measure(confidence.numpy(), correct.numpy())
    assert metrics.mce(confidence, correct, N_BINS) == pytest.approx(expected, abs=1e-10)


def test_summary_ece_netcal():
    # netcal's multi-class input: (N, K) probabilities and labels, as the official DACA code calls it.
    probs, labels = random_probs(3)
    expected = ECE(bins=N_BINS).measure(probs.numpy(), labels.numpy())
    assert metrics.summarize(probs, labels, N_BINS)["ece"] == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_brier_sklearn(seed):
    probs, labels = random_probs(seed)
    confidence, correct = top_label(probs, labels)
    expected = brier_score_loss(correct.numpy(), confidence.numpy())
    assert metrics.summarize(probs, labels, N_BINS)["brier"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_nll_sklearn(seed):
    probs, labels = random_probs(seed)
    expected = log_loss(labels.numpy(), probs.numpy(), labels=list(range(probs.shape[1])))
    assert metrics.summarize(probs, labels, N_BINS)["nll"] == pytest.approx(expected, abs=1e-9)


def test_multiclass_brier():
    probs, labels = random_probs(4)
    one_hot = np.eye(probs.shape[1])[labels.numpy()]
    expected = float(((probs.numpy() - one_hot) ** 2).sum(axis=1).mean())
    assert metrics.summarize(probs, labels, N_BINS)["brier_multiclass"] == pytest.approx(expected, abs=1e-12)


def test_accuracy():
    probs, labels = random_probs(5)
    expected = float((probs.argmax(-1) == labels).double().mean())
    assert metrics.summarize(probs, labels, N_BINS)["accuracy"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("norm,name", [("l1", "ece"), ("max", "mce")])
def test_torchmetrics_oracle(norm, name):
    confidence, correct = top_label(*random_probs(6))
    # torchmetrics puts a confidence of 1.0 into an extra bin, so this oracle needs data below 1.
    assert float(confidence.max()) < 1.0
    expected = float(binary_calibration_error(confidence.float(), correct.long(), n_bins=N_BINS, norm=norm))
    actual = getattr(metrics, name)(confidence, correct, N_BINS)
    assert actual == pytest.approx(expected, abs=1e-6)


def test_one_in_last_bin():
    confidence = torch.tensor([1.0, 1.0, 0.95, 0.05], dtype=torch.float64)
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    counts = metrics.reliability_bins(confidence, correct, N_BINS)["count"]
    assert counts == [1.0, 0, 0, 0, 0, 0, 0, 0, 0, 3.0]


def test_one_bin_confidence():
    confidence = torch.tensor([1.0, 1.0, 0.95], dtype=torch.float64)
    correct = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    mean_confidence = metrics.reliability_bins(confidence, correct, N_BINS)["confidence"][-1]
    assert mean_confidence == pytest.approx((1.0 + 1.0 + 0.95) / 3, abs=1e-12)


def test_ece_with_one():
    # All three samples share the last bin: |mean accuracy - mean confidence| = |2/3 - 2.95/3|.
    confidence = torch.tensor([1.0, 1.0, 0.95], dtype=torch.float64)
    correct = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    assert metrics.ece(confidence, correct, N_BINS) == pytest.approx(0.95 / 3, abs=1e-12)


def test_adaptive_ece_hand():
    # Sorted: (0.1, 0), (0.2, 1), (0.3, 0) | (0.4, 1), (0.6, 1), (0.9, 1).
    # Bin 1 gap: |1/3 - 0.2| = 2/15. Bin 2 gap: |1 - 1.9/3| = 1.1/3. Equal sizes, so aECE = (2/15 + 1.1/3) / 2 = 0.25.
    confidence = torch.tensor([0.9, 0.1, 0.4, 0.3, 0.6, 0.2], dtype=torch.float64)
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    assert metrics.adaptive_ece(confidence, correct, n_bins=2) == pytest.approx(0.25, abs=1e-12)


def test_adaptive_ece_one_bin():
    # One bin: |mean accuracy - mean confidence| over all samples.
    confidence = torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64)
    correct = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    assert metrics.adaptive_ece(confidence, correct, n_bins=1) == pytest.approx(abs(2 / 3 - 0.7), abs=1e-12)


def test_mce_empty_bins():
    # Two samples in bins 1 and 10: MCE is the larger gap and ignores the eight empty bins.
    confidence = torch.tensor([0.05, 0.95], dtype=torch.float64)
    correct = torch.tensor([0.0, 0.0], dtype=torch.float64)
    assert metrics.mce(confidence, correct, N_BINS) == pytest.approx(0.95, abs=1e-12)


def test_summary_shape_error():
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        metrics.summarize(torch.ones(3), torch.zeros(3, dtype=torch.long))


def test_summary_nan_error():
    probs = torch.tensor([[0.5, float("nan")], [0.4, 0.6]])
    with pytest.raises(ValueError, match="NaN"):
        metrics.summarize(probs, torch.tensor([0, 1]))


def test_bootstrap_contains_point():
    probs, labels = random_probs(7, n=200)
    low, high = metrics.bootstrap_interval(probs, labels, "accuracy", n_resamples=200, seed=0)
    point = metrics.summarize(probs, labels)["accuracy"]
    assert low <= point
    assert point <= high

