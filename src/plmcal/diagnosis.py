"""Drift diagnosis of a same-depth pair from its cached read-outs (no forward pass, no labels needed).

For every question: the per-layer JSD d_l between the PLM's and the PoLM's layer distributions,
the peak divergence layer l* = argmax_{l >= 2} |d_l - d_{l-1}|, each model's per-layer entropy,
and its inferential-stability entropy (ISE): the mean entropy over the layers l >= l*.
Questions split into two regimes: confidence drift (both final answers agree) and process drift
(they disagree). ``diagnose`` returns the numbers, ``write_figures`` draws them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plmcal import losses
from plmcal.pipeline import Readout, layer_divergence_for, require_equal_depth, support_for

log = logging.getLogger(__name__)

FIGURES = ("layer_jsd", "pdl_histogram", "layer_entropy", "ise_vs_confidence")


def _mean_std(values: torch.Tensor) -> dict[str, list[float]]:
    """Per-layer mean and std (ddof=0) over the rows of an (N, L) tensor; NaN when N = 0."""
    if values.shape[0] == 0:
        nan = [float("nan")] * values.shape[1]
        return {"mean": nan, "std": nan}
    return {"mean": values.mean(dim=0).tolist(), "std": values.std(dim=0, correction=0).tolist()}


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (no tie correction: ranks by stable sort); NaN for fewer than 3 points."""
    if x.numel() < 3:
        return float("nan")
    rank_x = torch.argsort(torch.argsort(x, stable=True)).double()
    rank_y = torch.argsort(torch.argsort(y, stable=True)).double()
    return float(torch.corrcoef(torch.stack([rank_x, rank_y]))[0, 1])


def diagnose(plm: Readout, polm: Readout, labels: torch.Tensor | None = None, support: str = "options") -> dict[str, Any]:
    """Compute the drift diagnosis on every question of the two read-outs.

    Returns a JSON-ready summary under "summary" and per-question arrays under "arrays"
    (jsd (N, L), pdl (N,) 1-based, entropies (N, L), ISE (N,), confidences (N,), agree (N,)).
    ``labels`` (optional) adds the accuracy of each model per regime.
    """
    if plm.n_layers == 0 or polm.n_layers == 0:
        raise ValueError("the diagnosis needs per-layer read-outs; set readout.lens=true.")
    require_equal_depth("the diagnosis", plm.spec.name, plm.n_layers, polm.spec.name, polm.n_layers)
    n_layers = plm.n_layers

    jsd = layer_divergence_for(plm, polm, support)  # (N, L), nats
    pdl = losses.peak_divergence_layer(jsd)  # (N,), 0-based
    after_pdl = losses.post_pdl_mask(pdl, n_layers)  # (N, L)
    h_plm = losses.layer_entropies(support_for(plm, support), 1.0, "all_post_pdl")  # (N, L), nats
    h_polm = losses.layer_entropies(support_for(polm, support), 1.0, "all_post_pdl")
    counts = after_pdl.sum(dim=1)
    ise_plm = (h_plm * after_pdl).sum(dim=1) / counts
    ise_polm = (h_polm * after_pdl).sum(dim=1) / counts

    plm_final, polm_final = plm.tensors["final_option_logits"], polm.tensors["final_option_logits"]
    conf_plm = torch.softmax(losses.fill_absent(plm_final), dim=-1).max(dim=-1).values
    conf_polm = torch.softmax(losses.fill_absent(polm_final), dim=-1).max(dim=-1).values
    agree = losses.agreement(plm_final, polm_final)
    regimes = {"agree": agree, "disagree": ~agree}

    summary: dict[str, Any] = {
        "support": support,
        "n_questions": int(agree.numel()),
        "n_layers": n_layers,
        "counts": {
            "confidence_drift": int(agree.sum()),  # agreeing questions
            "confidence_drift_inflated": int((agree & (conf_polm > conf_plm)).sum()),  # ... where the PoLM is the more confident
            "process_drift": int((~agree).sum()),  # disagreeing questions
        },
        "jsd": {name: _mean_std(jsd[mask]) for name, mask in regimes.items()},
        "entropy_plm": {name: _mean_std(h_plm[mask]) for name, mask in regimes.items()},
        "entropy_polm": {name: _mean_std(h_polm[mask]) for name, mask in regimes.items()},
        # 1-based layer numbers, as in the papers' figures.
        "pdl_histogram": {name: torch.bincount(pdl[mask] + 1, minlength=n_layers + 1)[1:].tolist() for name, mask in regimes.items()},
        "ise": {
            name: {
                "plm_mean": float(ise_plm[mask].mean()) if mask.any() else float("nan"),
                "polm_mean": float(ise_polm[mask].mean()) if mask.any() else float("nan"),
                "mean_sq_diff": float(((ise_plm - ise_polm)[mask] ** 2).mean()) if mask.any() else float("nan"),
                "spearman_polm_ise_vs_confidence": _spearman(ise_polm[mask], conf_polm[mask]),
            }
            for name, mask in regimes.items()
        },
        "confidence": {
            name: {"plm": float(conf_plm[mask].mean()) if mask.any() else float("nan"),
                   "polm": float(conf_polm[mask].mean()) if mask.any() else float("nan")}
            for name, mask in regimes.items()
        },
    }
    if labels is not None:
        summary["accuracy"] = {
            name: {"plm": float((plm_final.argmax(-1) == labels)[mask].double().mean()) if mask.any() else float("nan"),
                   "polm": float((polm_final.argmax(-1) == labels)[mask].double().mean()) if mask.any() else float("nan")}
            for name, mask in regimes.items()
        }
    arrays = {"jsd": jsd, "pdl": pdl + 1, "entropy_plm": h_plm, "entropy_polm": h_polm, "ise_plm": ise_plm, "ise_polm": ise_polm,
              "confidence_plm": conf_plm, "confidence_polm": conf_polm, "agree": agree}
    return {"summary": summary, "arrays": {k: v.numpy() for k, v in arrays.items()}}


def _band(axis, layers: np.ndarray, stats: dict[str, list[float]], label: str, color: str) -> None:
    mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
    axis.plot(layers, mean, color=color, label=label, marker="o", markersize=3)
    axis.fill_between(layers, mean - std, mean + std, color=color, alpha=0.15)


def write_figures(diagnosis: dict[str, Any], folder: Path, title: str = "") -> dict[str, Path]:
    """Draw the four diagnosis figures as PNGs into ``folder``; return {figure name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    summary, arrays = diagnosis["summary"], diagnosis["arrays"]
    layers = np.arange(1, summary["n_layers"] + 1)
    colors = {"agree": "tab:blue", "disagree": "tab:red"}
    counts = {"agree": summary["counts"]["confidence_drift"], "disagree": summary["counts"]["process_drift"]}
    names = {"agree": f"agree (confidence drift, n={counts['agree']})", "disagree": f"disagree (process drift, n={counts['disagree']})"}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}

    figure, axis = plt.subplots(figsize=(6, 3.6))
    for regime in ("agree", "disagree"):
        if counts[regime]:
            _band(axis, layers, summary["jsd"][regime], names[regime], colors[regime])
    axis.set(xlabel="layer", ylabel="JSD(PLM, PoLM) [nats]", title=f"Layer-wise divergence {title}".strip())
    axis.legend(fontsize=8)
    paths["layer_jsd"] = folder / "layer_jsd.png"

    def save(name: str) -> None:
        if name != "ise_vs_confidence":
            figure.axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        figure.tight_layout()
        figure.savefig(paths[name], dpi=110)
        plt.close(figure)

    save("layer_jsd")

    figure, axis = plt.subplots(figsize=(6, 3.6))
    bottom = np.zeros(len(layers))
    for regime in ("agree", "disagree"):
        values = np.asarray(summary["pdl_histogram"][regime])
        axis.bar(layers, values, bottom=bottom, color=colors[regime], label=names[regime])
        bottom += values
    axis.set(xlabel="peak divergence layer", ylabel="questions", title=f"Peak divergence layer {title}".strip())
    axis.legend(fontsize=8)
    paths["pdl_histogram"] = folder / "pdl_histogram.png"
    save("pdl_histogram")

    figure, axis = plt.subplots(figsize=(6, 3.6))
    for regime in ("agree", "disagree"):
        if counts[regime]:
            for model, style in (("plm", "--"), ("polm", "-")):
                stats = summary[f"entropy_{model}"][regime]
                axis.plot(layers, stats["mean"], style, color=colors[regime], label=f"{model.upper()}, {regime}")
    axis.set(xlabel="layer", ylabel="entropy [nats]", title=f"Layer entropy {title}".strip())
    axis.legend(fontsize=8)
    paths["layer_entropy"] = folder / "layer_entropy.png"
    save("layer_entropy")

    figure, axis = plt.subplots(figsize=(6, 3.6))
    agree = arrays["agree"].astype(bool)
    for regime, mask in (("agree", agree), ("disagree", ~agree)):
        axis.scatter(arrays["confidence_polm"][mask], arrays["ise_polm"][mask], s=6, alpha=0.5, color=colors[regime], label=f"PoLM, {regime}")
        axis.scatter(arrays["confidence_plm"][mask], arrays["ise_plm"][mask], s=6, alpha=0.5, marker="x", color=colors[regime], label=f"PLM, {regime}")
    axis.set(xlabel="final confidence", ylabel="ISE: mean entropy after the PDL [nats]", title=f"Stability vs confidence {title}".strip())
    axis.legend(fontsize=7)
    paths["ise_vs_confidence"] = folder / "ise_vs_confidence.png"
    save("ise_vs_confidence")
    return paths


def write_diagnosis(diagnosis: dict[str, Any], folder: Path, title: str = "") -> dict[str, Path]:
    """Write diagnosis.json, diagnosis.npz (per-question arrays) and the figures into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "diagnosis.json").write_text(json.dumps(diagnosis["summary"], indent=1))
    np.savez_compressed(folder / "diagnosis.npz", **diagnosis["arrays"])
    return write_figures(diagnosis, folder, title)


def scalar_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Flat scalars for a logger: counts, mean ISE per regime, and the JSD at the last layer."""
    flat = {f"diag/{name}": float(value) for name, value in summary["counts"].items()}
    for regime in ("agree", "disagree"):
        for key, value in summary["ise"][regime].items():
            flat[f"diag/ise_{regime}_{key}"] = float(value)
        flat[f"diag/final_jsd_{regime}"] = float(summary["jsd"][regime]["mean"][-1])
    return flat


def load_pair(overrides: list[str] | tuple[str, ...] = ()) -> tuple[Any, Readout, Readout, torch.Tensor]:
    """Compose conf/ with Hydra ``overrides`` and return (cfg, PLM read-out, PoLM read-out, labels).

    The read-outs come from the cache when a job with the same pair, dataset and prompt ran before.
    Otherwise both models run once, which takes minutes on a CPU for a full benchmark.
    """
    from hydra import compose, initialize_config_dir

    from plmcal import models
    from plmcal.prompt import PromptSpec
    from plmcal.run import REPO_ROOT, load_readouts

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    prompt = PromptSpec.from_config(cfg.prompt)
    plm_spec, polm_spec = models.ModelSpec.from_config(cfg.pair.plm), models.ModelSpec.from_config(cfg.pair.polm)
    rows, readouts = load_readouts(cfg, prompt, plm_spec, polm_spec)
    labels = torch.tensor([row.gold for row in rows])
    return cfg, readouts["plm"], readouts["polm"], labels
