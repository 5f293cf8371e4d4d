"""Print one of the papers' tables next to our runs: ``python -m plmcal.paper TABLE RUN_DIR...``.

Our side comes from ``plmcal.aggregate`` (mean ± std over each group's splits); the published side
from ``experiments/published/<table>.csv``. A group of ours is matched to a published row by
(PoLM model, dataset, method) through ``PAIR_MODELS`` and ``METHOD_NAMES``. Groups of pairs the
paper never ran (the embedded pairs) get no published cell; the published table is then printed
below ours, so both stay on one page.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

from plmcal import aggregate

log = logging.getLogger(__name__)

PUBLISHED_DIR = Path(__file__).resolve().parents[2] / "experiments" / "published"

# Table ids and their files: DACA's tables by number, and the Dual-Align comparison.
TABLES = {str(n): f"daca_table{n}.csv" for n in (1, 2, 3, 7, 8, 9, 10, 11, 12)} | {"dual_align": "dual_align.csv"}

# Our pair name -> the PoLM's name in the published tables. Pairs missing here never match.
PAIR_MODELS = {
    "qwen2.5-7b": "Qwen2.5-7B-Instruct",
    "qwen2.5-14b": "Qwen2.5-14B-Instruct",
    "qwen2.5-32b": "Qwen2.5-32B-Instruct",
    "qwen2.5-72b": "Qwen2.5-72B-Instruct",
    "qwen2.5-7b_math-instruct": "Qwen2.5-Math-7B-Instruct",
    "qwen3-8b": "Qwen3-8B",
    "gemma-3-12b": "Gemma-3-12B-Instruct",
    "gemma-3-27b": "Gemma-3-27B-Instruct",
    "yi-1.5-34b": "Yi-1.5-34B-Chat",
    "llama-3-70b": "Llama-3-70B-Instruct",
    "llama-3-8b": "Llama-3-8B-Instruct",
    "llama-3.1-8b_tulu3-sft": "Llama-3.1-Tulu-3-8B-SFT",
    "llama-3.1-8b_tulu3-dpo": "Llama-3.1-Tulu-3-8B-DPO",
    "llama-3.1-8b_tulu3-rlvr": "Llama-3.1-Tulu-3-8B",
    "llama-3-8b_iter-dpo": "Llama-3-8b-Iter-DPO-179k",
    "llama-3-8b_self-instruct": "Llama-3-8B-Self-Instruct-100K",
    "deepseek-v2-lite": "DeepSeek-V2-Lite-Chat",
}

# Our method name -> the published method name (both DACA modes are "Ours" in the DACA paper).
METHOD_NAMES = {"daca_faithful": "daca", "daca": "daca"}

# (our aggregate header, published metric): the metrics both sides report, in the DACA paper's column order.
METRICS = [("ECE %", "ece_pct"), ("MCE %", "mce_pct"), ("AECE %", "aece_pct"), ("Brier", "brier"), ("NLL", "nll")]


class PaperError(ValueError):
    """An unknown table id or an invalid published file."""


def published_path(table: str) -> Path:
    if table not in TABLES:
        raise PaperError(f"table {table!r} is unknown; use one of {sorted(TABLES, key=lambda t: (not t.isdigit(), t.zfill(3)))}.")
    return PUBLISHED_DIR / TABLES[table]


def load_published(path: Path) -> list[dict[str, str]]:
    """Rows of a published-numbers CSV; raises when a required column is missing."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        required = {"model", "plm", "dataset", "method", "metric", "value", "std", "source"}
        missing = required - set(reader.fieldnames or [])
        if missing:
            raise PaperError(f"{path} lacks the columns {sorted(missing)}; see experiments/published/README.md for the schema.")
        return list(reader)


def published_cell(rows: list[dict[str, str]], model: str, dataset: str, method: str, metric: str) -> str:
    """'value ± std' of the published row, '' when the published table has no such number."""
    found = [r for r in rows if (r["model"], r["dataset"], r["method"], r["metric"]) == (model, dataset, method, metric)]
    if not found:
        return ""
    if len(found) > 1:
        found = [r for r in found if r["plm"] in ("", "pre-trained counterpart")] or found
    row = found[0]
    return f"{row['value']} ± {row['std']}" if row["std"] else row["value"]


def _ours(row: dict[str, Any], header: str) -> str:
    stat = row.get(header)
    if stat is None or stat["n"] == 0 or math.isnan(stat["mean"]):
        return ""
    return aggregate.format_cell(stat, 3 if header in ("Brier", "NLL") else 2)


def side_by_side(rows: list[dict[str, Any]], published: list[dict[str, str]], with_paper: bool = True) -> str:
    """Markdown: one line per group of ours, each metric as 'ours' then 'paper' (only 'ours' without ``with_paper``).

    The confidence interval is aggregate's bootstrap of our mean ECE over test questions.
    """
    metrics = [(h, m) for h, m in METRICS if any(r["metric"] == m for r in published) or any(_ours(row, h) for row in rows)]
    header = ["pair", "dataset", "method", "setting", "splits", "acc %", "ECE % ours 95% CI"]
    for ours_header, _ in metrics:
        header += [f"{ours_header} ours", f"{ours_header} paper"] if with_paper else [ours_header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        model = PAIR_MODELS.get(row["pair"], "")
        method = METHOD_NAMES.get(row["method"], row["method"])
        interval = row.get("ECE % interval")
        ci = "" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]"
        cells = [row["pair"], row["dataset"], row["method"], row["setting"], str(row["n_jobs"]), _ours(row, "acc %"), ci]
        for ours_header, metric in metrics:
            cells.append(_ours(row, ours_header))
            if with_paper:
                cells.append(published_cell(published, model, row["dataset"], method, metric) if model else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def published_markdown(published: list[dict[str, str]]) -> str:
    """Markdown of the published table: one line per (model, PLM, dataset, method)."""
    metrics = [m for _, m in METRICS if any(r["metric"] == m for r in published)]
    keys = list(dict.fromkeys((r["model"], r["plm"], r["dataset"], r["method"]) for r in published))
    lines = ["| model | PLM | dataset | method | " + " | ".join(metrics) + " |", "|---|---|---|---|" + "|".join("---" for _ in metrics) + "|"]
    for model, plm, dataset, method in keys:
        cells = []
        for metric in metrics:
            match = [r for r in published if (r["model"], r["plm"], r["dataset"], r["method"], r["metric"]) == (model, plm, dataset, method, metric)]
            if not match:
                cells.append("")
            elif match[0]["std"]:
                cells.append(f"{match[0]['value']} ± {match[0]['std']}")
            else:
                cells.append(match[0]["value"])
        lines.append(f"| {model} | {plm} | {dataset} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_table(table: str, run_dirs: Sequence[Path], n_resamples: int = 1000) -> str:
    """Markdown of our runs beside the published table ``table``."""
    path = published_path(table)
    published = load_published(path)
    jobs = aggregate.load_jobs(run_dirs)
    if not jobs:
        raise FileNotFoundError(f"no results.json under {[str(d) for d in run_dirs]}; did the sweep finish?")
    rows = [aggregate.summarize_group(group, n_resamples) for group in aggregate.group_jobs(jobs)]
    sources = sorted({r["source"] for r in published})
    title = f"DACA Table {table}" if table.isdigit() else f"Table {table}"
    matched = any(PAIR_MODELS.get(r["pair"]) in {p["model"] for p in published} for r in rows)
    parts = [
        f"## {title}: ours beside the published numbers\n\n"
        f"Ours: {len(jobs)} jobs from {', '.join(str(d) for d in run_dirs)}; cells are mean ± std over splits "
        f"(test split, ECE in %, 10 bins). Paper: {'; '.join(sources) if sources else 'no published rows (' + path.name + ' is empty)'}.",
        side_by_side(rows, published, with_paper=matched),
    ]
    if published and not matched:
        parts.append(f"None of our pairs is a model of the paper's table, so here is the published {title} as printed:\n\n"
                     + published_markdown(published))
    return "\n\n".join(parts) + "\n"


def export_results(run_dirs: Sequence[Path], destination: Path) -> int:
    """Copy every job's results.json and predictions.npz (not logs or plots) into ``destination``.

    Each job keeps its folder name, so a copy is small enough to commit and ``plmcal.aggregate``
    reads it like the sweep itself. Returns the number of jobs copied.
    """
    copied = 0
    for job in aggregate.load_jobs(run_dirs):
        target = destination / job.folder.name
        target.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "predictions.npz"):
            if (job.folder / name).exists():
                shutil.copy2(job.folder / name, target / name)
        copied += 1
    return copied


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m plmcal.paper", description="Print a paper table next to our runs.")
    parser.add_argument("table", help=f"table id: {', '.join(TABLES)}")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="Hydra multirun folders (searched recursively for results.json)")
    parser.add_argument("--out", type=Path, help="also write paper_table<TABLE>.md into this folder")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap replicates of the ECE interval (default 1000)")
    parser.add_argument("--export", type=Path, help="also copy each job's results.json and predictions.npz into this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        text = paper_table(args.table, args.run_dirs, args.resamples)
    except (PaperError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"paper_table{args.table}.md").write_text(text)
    if args.export:
        log.info("Copied %d jobs into %s", export_results(args.run_dirs, args.export), args.export)
    print(text)


if __name__ == "__main__":
    main()
