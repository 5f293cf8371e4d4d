"""Aggregate multirun directories into tables: mean ± std over splits, bootstrap intervals.

A group is one (pair, dataset, prompt, method, setting) cell, where the setting is the job's
overrides minus the ones that only pick the split (``split.seed``, ``seed``) or that are already
columns. Each job contributes one value per metric; the table shows their mean and standard
deviation (ddof=1) over the group's jobs.

The interval of the mean ECE is a percentile bootstrap over test questions: every replicate
resamples the test questions of each job (with replacement, within its own split), recomputes
each job's ECE and averages over the jobs. It needs the jobs' ``predictions.npz``; a group without
them gets no interval. ``--compare a:b`` adds the paired bootstrap of ECE(b) - ECE(a) over the
same test questions, split by split.

Usage: ``python -m plmcal.aggregate RUN_DIR [RUN_DIR ...] [--out DIR] [--compare daca:dual_align]``
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from plmcal.report import METHOD_ORDER, value_at

log = logging.getLogger(__name__)

# Overrides that never define a group: they pick the split, or are columns of their own.
SPLIT_OVERRIDES = ("split.seed=", "seed=")
COLUMN_OVERRIDES = ("pair=", "dataset=", "method=", "prompt=", "experiment=", "logger", "hydra.", "paths.", "device=")

# (header, path into results.json, scale): the metrics averaged over a group's jobs.
METRICS = [
    ("T", ("temperature",), 1),
    ("ECE %", ("test", "ece"), 100),
    ("AECE %", ("test", "aece"), 100),
    ("MCE %", ("test", "mce"), 100),
    ("Brier", ("test", "brier"), 1),
    ("NLL", ("test", "nll"), 1),
    ("acc %", ("test", "accuracy"), 100),
    ("acc before %", ("test_uncalibrated", "accuracy"), 100),
    ("conf %", ("test", "confidence"), 100),
    ("PLM ECE %", ("plm_test", "ece"), 100),
    ("agree %", ("diagnostics", "agreement_rate"), 100),
    ("option mass PoLM %", ("diagnostics", "option_mass_polm"), 100),
    ("greedy letter PoLM %", ("diagnostics", "greedy_is_option_polm"), 100),
]
# The short table: the headline metric with its interval, and the reviewer checks.
SHORT = ["T", "ECE %", "AECE %", "Brier", "acc %", "agree %", "option mass PoLM %", "greedy letter PoLM %"]


@dataclass
class Job:
    """One finished sweep cell: its results.json and, when present, its per-question predictions."""

    folder: Path
    result: dict[str, Any]
    predictions: dict[str, np.ndarray] | None = None

    @property
    def split_seed(self) -> int:
        return int(self.result.get("split_seed", self.result.get("seed", 0)))


@dataclass
class Group:
    pair: str
    dataset: str
    prompt: str
    method: str
    setting: str
    jobs: list[Job] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.method} [{self.setting}]" if self.setting else self.method


def setting_of(result: dict) -> str:
    """The overrides that tell this job's method setting apart (split choices and columns removed)."""
    kept = [o for o in result.get("overrides", []) if not o.startswith(SPLIT_OVERRIDES + COLUMN_OVERRIDES)]
    return " ".join(sorted(kept))


def load_jobs(run_dirs: Iterable[Path]) -> list[Job]:
    """Load every results.json under the given folders, with its predictions.npz when there is one."""
    jobs = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory {str(run_dir)!r} not found; pass a Hydra multirun folder (outputs/multiruns/...).")
        found = sorted(run_dir.rglob("results.json"))
        if not found:
            log.warning("No results.json under %s", run_dir)
        for path in found:
            try:
                result = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                log.warning("Skipping unreadable %s: %s", path, error)
                continue
            arrays = path.parent / "predictions.npz"
            predictions = dict(np.load(arrays)) if arrays.exists() else None
            jobs.append(Job(path.parent, result, predictions))
    return jobs


def group_jobs(jobs: Iterable[Job]) -> list[Group]:
    """Group jobs by (pair, dataset, prompt, method, setting), sorted for reading."""
    groups: dict[tuple, Group] = {}
    for job in jobs:
        r = job.result
        key = (r.get("pair", ""), r.get("dataset", ""), r.get("prompt", ""), r.get("method", ""), setting_of(r))
        groups.setdefault(key, Group(*key)).jobs.append(job)
    for group in groups.values():
        seeds = [job.split_seed for job in group.jobs]
        if len(set(seeds)) != len(seeds):
            log.warning("%s on %s: %d jobs share split seeds %s; each split is counted once per job.", group.label, group.dataset, len(seeds), seeds)
    return sorted(groups.values(), key=lambda g: (g.pair, g.dataset, g.prompt, METHOD_ORDER.get(g.method, 50), g.method, g.setting))


def batched_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """(B,) ECE of each row of (B, N) confidences and 0/1 correctness, with equal-width bins.

    The binning is that of ``plmcal.metrics.ece``: bin b covers (b/n, (b+1)/n], 0 goes to the first
    bin and 1.0 to the last one.
    """
    rows, n = confidence.shape
    index = np.clip(np.ceil(confidence * n_bins) - 1, 0, n_bins - 1).astype(np.int64)  # (B, N)
    flat = (index + n_bins * np.arange(rows)[:, None]).ravel()
    counts = np.bincount(flat, minlength=rows * n_bins).reshape(rows, n_bins)
    conf_sum = np.bincount(flat, weights=confidence.ravel(), minlength=rows * n_bins).reshape(rows, n_bins)
    hit_sum = np.bincount(flat, weights=correct.ravel().astype(np.float64), minlength=rows * n_bins).reshape(rows, n_bins)
    return np.abs(hit_sum - conf_sum).sum(axis=1) / n


def _confidence_correct(predictions: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence and 0/1 correctness of the calibrated PoLM on each test question."""
    correct = predictions["prediction"].astype(np.int64) == predictions["labels"].astype(np.int64)
    return predictions["confidence"].astype(np.float64), correct.astype(np.float64)


def bootstrap_mean_ece(jobs: Sequence[Job], n_resamples: int = 1000, seed: int = 0, level: float = 0.95, n_bins: int = 10) -> tuple[float, float] | None:
    """Percentile interval of the mean test ECE over ``jobs``, resampling questions within each job."""
    if not jobs or any(job.predictions is None for job in jobs):
        return None
    rng = np.random.default_rng(seed)
    total = np.zeros(n_resamples)
    for job in jobs:
        confidence, correct = _confidence_correct(job.predictions)
        pick = rng.integers(0, confidence.size, size=(n_resamples, confidence.size))
        total += batched_ece(confidence[pick], correct[pick], n_bins)
    values = total / len(jobs)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def paired_difference(base: Group, other: Group, n_resamples: int = 1000, seed: int = 0, level: float = 0.95, n_bins: int = 10) -> dict[str, Any] | None:
    """Mean over shared splits of ECE(other) - ECE(base), with a paired percentile bootstrap interval.

    Both groups are resampled with the same question indices in each split, so the interval reflects
    the difference between the methods, not the spread of the questions. Returns None when the two
    groups share no split with predictions.
    """
    by_seed = {job.split_seed: job for job in base.jobs if job.predictions is not None}
    pairs = [(by_seed[job.split_seed], job) for job in other.jobs if job.predictions is not None and job.split_seed in by_seed]
    if not pairs:
        return None
    rng = np.random.default_rng(seed)
    total, point = np.zeros(n_resamples), 0.0
    for job_a, job_b in pairs:
        if not np.array_equal(job_a.predictions["test_index"], job_b.predictions["test_index"]):
            raise ValueError(f"{job_a.folder} and {job_b.folder} have the same split seed but different test questions; "
                             "were they run on different data or split.test_size?")
        conf_a, hit_a = _confidence_correct(job_a.predictions)
        conf_b, hit_b = _confidence_correct(job_b.predictions)
        pick = rng.integers(0, conf_a.size, size=(n_resamples, conf_a.size))
        total += batched_ece(conf_b[pick], hit_b[pick], n_bins) - batched_ece(conf_a[pick], hit_a[pick], n_bins)
        point += batched_ece(conf_b[None], hit_b[None], n_bins)[0] - batched_ece(conf_a[None], hit_a[None], n_bins)[0]
    tail = (1.0 - level) / 2.0
    values = total / len(pairs)
    return {"delta": point / len(pairs), "low": float(np.quantile(values, tail)), "high": float(np.quantile(values, 1.0 - tail)), "n_splits": len(pairs)}


def summarize_group(group: Group, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Summarize a group as one row: mean, std and count of every metric, and the ECE's bootstrap interval."""
    row: dict[str, Any] = {"pair": group.pair, "dataset": group.dataset, "prompt": group.prompt, "method": group.method,
                           "setting": group.setting, "n_jobs": len(group.jobs), "split_seeds": sorted(j.split_seed for j in group.jobs)}
    for header, path, scale in METRICS:
        values = [v for v in (value_at(job.result, path) for job in group.jobs) if isinstance(v, (int, float))]
        values = [float(v) * scale for v in values]
        row[header] = {
            "mean": float(np.mean(values)) if values else math.nan,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
            "n": len(values),
        }
    interval = bootstrap_mean_ece(group.jobs, n_resamples, seed)
    row["ECE % interval"] = None if interval is None else [100 * interval[0], 100 * interval[1]]
    return row


def format_cell(stat: dict[str, float], digits: int) -> str:
    if stat["n"] == 0 or math.isnan(stat["mean"]):
        return ""
    if math.isnan(stat["std"]):
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _digits(header: str) -> int:
    return 3 if header in ("T", "Brier", "NLL") else 2


def markdown_rows(rows: list[dict[str, Any]], headers: Sequence[str] = SHORT) -> str:
    """Render the long table: one line per group with mean ± std, and the ECE interval."""
    columns = ["pair", "dataset", "method", "setting", "splits"] + list(headers) + ["ECE 95% CI"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        interval = row["ECE % interval"]
        cells = [row["pair"], row["dataset"], row["method"], row["setting"], str(row["n_jobs"])]
        cells += [format_cell(row[h], _digits(h)) for h in headers]
        cells.append("" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pivot_markdown(rows: list[dict[str, Any]], metric: str = "ECE %") -> str:
    """Render methods (with their settings) as rows and datasets as columns, each cell 'mean ± std [CI]'."""
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    labels = list(dict.fromkeys((row["pair"], row["method"], row["setting"]) for row in rows))
    lines = ["| pair | method | setting | " + " | ".join(datasets) + " |", "|---|---|---|" + "|".join("---" for _ in datasets) + "|"]
    for pair, method, setting in labels:
        cells = []
        for dataset in datasets:
            match = [r for r in rows if (r["pair"], r["method"], r["setting"], r["dataset"]) == (pair, method, setting, dataset)]
            if not match:
                cells.append("")
                continue
            text = format_cell(match[0][metric], _digits(metric))
            interval = match[0]["ECE % interval"] if metric == "ECE %" else None
            cells.append(text + ("" if interval is None else f" [{interval[0]:.1f}, {interval[1]:.1f}]"))
        lines.append(f"| {pair} | {method} | {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_markdown(groups: list[Group], comparisons: Sequence[tuple[str, str]], n_resamples: int, seed: int) -> tuple[str, list[dict]]:
    """Compute paired ECE differences (other - base) per (pair, dataset, prompt) for each ``base:other`` request."""
    found = []
    for base_label, other_label in comparisons:
        for base in groups:
            if base.label != base_label:
                continue
            for other in groups:
                if other.label == other_label and (other.pair, other.dataset, other.prompt) == (base.pair, base.dataset, base.prompt):
                    diff = paired_difference(base, other, n_resamples, seed)
                    if diff is not None:
                        found.append({"pair": base.pair, "dataset": base.dataset, "base": base_label, "other": other_label} | diff)
    lines = ["| pair | dataset | comparison | Δ ECE % (other - base) | 95% CI | splits |", "|---|---|---|---|---|---|"]
    for d in found:
        lines.append(f"| {d['pair']} | {d['dataset']} | {d['other']} vs {d['base']} | {100 * d['delta']:+.2f} | "
                     f"[{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] | {d['n_splits']} |")
    return "\n".join(lines), found


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    headers = [h for h, _, _ in METRICS]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["pair", "dataset", "prompt", "method", "setting", "n_jobs", "split_seeds"]
                        + [f"{h} {stat}" for h in headers for stat in ("mean", "std")] + ["ECE % low", "ECE % high"])
        for row in rows:
            interval = row["ECE % interval"] or [math.nan, math.nan]
            writer.writerow([row["pair"], row["dataset"], row["prompt"], row["method"], row["setting"], row["n_jobs"],
                             " ".join(map(str, row["split_seeds"]))]
                            + [f"{row[h][stat]:.6g}" for h in headers for stat in ("mean", "std")] + [f"{v:.6g}" for v in interval])


def aggregate(run_dirs: Sequence[Path], out: Path, comparisons: Sequence[tuple[str, str]] = (), n_resamples: int = 1000, seed: int = 0) -> str:
    """Write aggregate.md, aggregate.csv and aggregate.json into ``out``; return the markdown."""
    jobs = load_jobs(run_dirs)
    if not jobs:
        raise FileNotFoundError(f"no results.json under {[str(d) for d in run_dirs]}; did the sweep finish?")
    groups = group_jobs(jobs)
    rows = [summarize_group(group, n_resamples, seed) for group in groups]
    sources = ", ".join(str(d) for d in run_dirs)
    parts = [f"# Aggregated results\n\n{len(jobs)} jobs in {len(groups)} groups from {sources}. "
             f"Cells: mean ± std over splits; CI: {n_resamples}-replicate percentile bootstrap of the mean ECE over test questions.",
             "## ECE % by dataset\n\n" + pivot_markdown(rows), "## Fitted T by dataset\n\n" + pivot_markdown(rows, "T"),
             "## All groups\n\n" + markdown_rows(rows)]
    differences: list[dict] = []
    if comparisons:
        text, differences = compare_markdown(groups, comparisons, n_resamples, seed)
        parts.append("## Paired differences\n\n" + text)
    markdown = "\n\n".join(parts) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "aggregate.md").write_text(markdown)
    write_csv(rows, out / "aggregate.csv")
    (out / "aggregate.json").write_text(json.dumps({"rows": rows, "differences": differences, "sources": [str(d) for d in run_dirs]}, indent=1))
    return markdown


def parse_comparison(text: str) -> tuple[str, str]:
    base, sep, other = text.partition(":")
    if not sep or not base or not other:
        raise argparse.ArgumentTypeError(f"--compare {text!r} is invalid; use BASE:OTHER with method labels, e.g. daca:dual_align.")
    return base, other


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m plmcal.aggregate", description="Aggregate multirun folders into tables.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="Hydra multirun folders (searched recursively for results.json)")
    parser.add_argument("--out", type=Path, help="output folder (default: the first run folder)")
    parser.add_argument("--compare", type=parse_comparison, action="append", default=[],
                        help="paired ECE difference BASE:OTHER between two method labels, repeatable")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap replicates (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    args = parser.parse_args(argv)
    if args.resamples < 1:
        parser.error(f"--resamples {args.resamples} is invalid; use a positive count such as 1000.")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(aggregate(args.run_dirs, args.out or args.run_dirs[0], args.compare, args.resamples, args.seed))


if __name__ == "__main__":
    main()
