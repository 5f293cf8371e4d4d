"""Calibration metrics on top-label confidences.

ECE and MCE use equal-width bins in which a confidence of exactly 1.0 falls into the last bin
(torchmetrics 1.x sends it to an extra bin that is never reported: torchmetrics issue #3510 on GitHub). The adaptive ECE
uses equal-mass bins (the quantity of Nixon et al. 2019); it is not netcal's ``ACE``.
Brier is the top-label score ``mean((confidence - correct)^2)`` as in the DACA paper; the
multi-class Brier score is reported alongside as ``brier_multiclass``.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy


def _binned_gaps(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return per-bin (count, mean confidence, accuracy) for equal-width bins (lower edge open)."""
    conf = confidence.double()
    # Bin b covers (b/n, (b+1)/n]; 0 goes to the first bin and 1.0 to the last one.
    index = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    counts = torch.bincount(index, minlength=n_bins).double()
    conf_sum = torch.bincount(index, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(index, weights=correct.double(), minlength=n_bins)
    safe = counts.clamp(min=1)
    return counts, conf_sum / safe, acc_sum / safe


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 10) -> dict[str, list[float]]:
    counts, mean_conf, accuracy = _binned_gaps(confidence, correct, n_bins)
    return {"count": counts.tolist(), "confidence": mean_conf.tolist(), "accuracy": accuracy.tolist()}


def ece(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 10) -> float:
    """Expected calibration error: bin-weighted mean |accuracy - confidence| over equal-width bins."""
    counts, mean_conf, accuracy = _binned_gaps(confidence, correct, n_bins)
    return float((counts * (accuracy - mean_conf).abs()).sum() / counts.sum())


def mce(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 10) -> float:
    """Maximum calibration error over the non-empty equal-width bins."""
    counts, mean_conf, accuracy = _binned_gaps(confidence, correct, n_bins)
    gaps = (accuracy - mean_conf).abs()[counts > 0]
    return float(gaps.max()) if gaps.numel() else float("nan")


def adaptive_ece(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 10) -> float:
    """ECE over equal-mass bins: samples sorted by confidence, split into ``n_bins`` near-equal groups."""
    order = torch.argsort(confidence.double(), stable=True)
    conf, hit = confidence.double()[order], correct.double()[order]
    total = 0.0
    for chunk_conf, chunk_hit in zip(torch.tensor_split(conf, n_bins), torch.tensor_split(hit, n_bins)):
        if chunk_conf.numel():
            total += chunk_conf.numel() * abs(float(chunk_hit.mean() - chunk_conf.mean()))
    return total / conf.numel()


def summarize(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> dict[str, float]:
    """Compute every metric for (N, K) probabilities and (N,) gold indices."""
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (N, K) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}.")
    if not torch.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or inf; the read-out or the temperature is invalid.")
    confidence, prediction = probs.max(dim=-1)
    correct = (prediction == labels).double()
    gold_prob = probs.gather(1, labels[:, None]).squeeze(1).double()
    one_hot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return {
        "accuracy": float(multiclass_accuracy(prediction, labels, num_classes=probs.shape[1], average="micro")),
        "confidence": float(confidence.double().mean()),
        "ece": ece(confidence, correct, n_bins),
        "aece": adaptive_ece(confidence, correct, n_bins),
        "mce": mce(confidence, correct, n_bins),
        "brier": float(((confidence.double() - correct) ** 2).mean()),
        "brier_multiclass": float(((probs.double() - one_hot) ** 2).sum(dim=-1).mean()),
        "nll": float(-(gold_prob.clamp(min=1e-12)).log().mean()),
        "n": int(labels.numel()),
    }


def bootstrap_interval(
    probs: torch.Tensor, labels: torch.Tensor, metric: str = "ece", n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of one metric over questions."""
    generator = torch.Generator().manual_seed(seed)
    n = labels.numel()
    values = []
    for _ in range(n_resamples):
        pick = torch.randint(0, n, (n,), generator=generator)
        values.append(summarize(probs[pick], labels[pick])[metric])
    values_t = torch.tensor(values)
    tail = (1 - level) / 2
    return float(torch.quantile(values_t, tail)), float(torch.quantile(values_t, 1 - tail))
