"""Reliability diagrams with confidence histograms, before and after calibration."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def reliability_diagram(result: dict, path: Path) -> Path:
    """Draw two columns (before and after calibration): accuracy per confidence bin over a count histogram."""
    panels = [("before", "uncalibrated", result["test_uncalibrated"], 1.0), ("after", result["method"], result["test"], result["temperature"])]
    figure, axes = plt.subplots(2, 2, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for column, (key, label, summary, temperature) in enumerate(panels):
        bins = result["reliability"][key]
        n_bins = len(bins["count"])
        centers = (np.arange(n_bins) + 0.5) / n_bins
        counts = np.asarray(bins["count"])
        accuracy = np.where(counts > 0, bins["accuracy"], np.nan)
        confidence = np.where(counts > 0, bins["confidence"], np.nan)
        top, bottom = axes[0, column], axes[1, column]
        top.bar(centers, accuracy, width=1 / n_bins, edgecolor="black", color="tab:blue", label="accuracy")
        # The gap bar spans from the lower to the higher of accuracy and confidence.
        top.bar(centers, np.abs(confidence - accuracy), bottom=np.fmin(accuracy, confidence), width=1 / n_bins, color="tab:red", alpha=0.3, label="gap to confidence")
        top.plot([0, 1], [0, 1], "k--", linewidth=1)
        top.set_ylim(0, 1)
        fitted = f"T={temperature:.3f}" if temperature is not None else result.get("calibrator", {}).get("kind", "?")
        top.set_title(f"{label}: {fitted}, ECE={100 * summary['ece']:.2f}%", fontsize=9)
        top.set_ylabel("accuracy")
        top.legend(loc="upper left", fontsize=7)
        bottom.bar(centers, counts, width=1 / n_bins, edgecolor="black", color="gray")
        bottom.set_xlabel("confidence")
        bottom.set_ylabel("count")
        bottom.set_xlim(0, 1)
    figure.suptitle(f"{result['pair']} on {result['dataset']} (test split, n={result['n_test']})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
