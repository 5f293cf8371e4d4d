"""Result files of one job (results.json, results.md/.csv, reliability PNG) and multirun tables."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

# Columns of the comparison tables: (header, path into results.json, scale).
COLUMNS = [
    ("pair", ("pair",), None),
    ("dataset", ("dataset",), None),
    ("prompt", ("prompt",), None),
    ("method", ("method",), None),
    ("T", ("temperature",), 1),
    ("ECE %", ("test", "ece"), 100),
    ("AECE %", ("test", "aece"), 100),
    ("MCE %", ("test", "mce"), 100),
    ("Brier", ("test", "brier"), 1),
    ("NLL", ("test", "nll"), 1),
    ("acc %", ("test", "accuracy"), 100),
    ("conf %", ("test", "confidence"), 100),
    ("agree %", ("diagnostics", "agreement_rate"), 100),
    ("option mass PoLM %", ("diagnostics", "option_mass_polm"), 100),
    ("n test", ("n_test",), None),
    ("split seed", ("split_seed",), None),
    ("overrides", ("overrides_text",), None),
]


# Row order of comparison tables: the baselines first, the oracle last.
METHOD_ORDER = {"vanilla": 0, "daca_faithful": 1, "daca": 2, "match_all": 3, "dual_align": 4, "ts_oracle": 9}


def value_at(result: dict, path: Sequence[str]) -> Any:
    """Return the value at ``path`` in nested dicts, or None where a key is missing."""
    value: Any = result
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def table_rows(results: Iterable[dict]) -> list[list[str]]:
    rows = []
    for result in results:
        # Only the overrides that are not already columns tell sweep cells apart.
        column_prefixes = ("pair=", "dataset=", "method=", "prompt=", "split.seed=", "experiment=")
        extra = [o for o in result.get("overrides", []) if not o.startswith(column_prefixes)]
        result = dict(result, overrides_text=" ".join(extra))
        row = []
        for _, path, scale in COLUMNS:
            value = value_at(result, path)
            if scale is None or value is None:
                row.append("" if value is None else str(value))
            else:
                row.append(f"{value * scale:.3f}" if scale == 1 else f"{value * scale:.2f}")
        rows.append(row)
    return rows


def markdown_table(results: list[dict]) -> str:
    headers = [name for name, _, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def write_table(results: list[dict], folder: Path, stem: str) -> str:
    """Write ``stem.md`` and ``stem.csv`` into ``folder``; return the markdown text."""
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown_table(results)
    (folder / f"{stem}.md").write_text(text + "\n")
    with (folder / f"{stem}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([name for name, _, _ in COLUMNS])
        writer.writerows(table_rows(results))
    return text


def job_rows(result: dict) -> list[dict]:
    """Rows of one job's own table: the PoLM before and after calibration, and the PLM as reference."""
    before = dict(result, method="uncalibrated PoLM", temperature=1.0, test=result["test_uncalibrated"])
    plm = dict(result, method="PLM (reference)", temperature=1.0, test=result["plm_test"])
    return [before, result, plm]


def write_job(result: dict, folder: Path) -> str:
    """Write results.json, predictions.npz (per-question test probabilities), the job table and its plot."""
    folder.mkdir(parents=True, exist_ok=True)  # run_job may be called outside Hydra with a new folder
    arrays = result.get("arrays")
    if arrays is not None:
        np.savez_compressed(folder / "predictions.npz", **arrays)
    (folder / "results.json").write_text(json.dumps({k: v for k, v in result.items() if k != "arrays"}, indent=1))
    from plmcal.plots import reliability_diagram

    reliability_diagram(result, folder / "reliability.png")
    return write_table(job_rows(result), folder, "results")


def write_error(folder: Path, error: BaseException, overrides: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "error.json").write_text(json.dumps({"error": f"{type(error).__name__}: {error}", "overrides": overrides}, indent=1))


def collect_errors(sweep_dir: Path) -> list[dict]:
    """Load the error.json of every failed job under a multirun directory."""
    return [dict(json.loads(p.read_text()), folder=str(p.parent)) for p in sorted(sweep_dir.rglob("error.json"))]


def collect(sweep_dir: Path) -> list[dict]:
    """Load every job's results.json under a multirun directory, in job order."""
    found = []
    for path in sorted(sweep_dir.rglob("results.json"), key=lambda p: (len(p.parts), str(p))):
        try:
            found.append(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            log.warning("Skipping unreadable %s: %s", path, error)
    return found


if __name__ == "__main__":
    import sys

    # Rebuild a multirun's comparison table: python -m plmcal.report outputs/multiruns/<time>
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m plmcal.report MULTIRUN_DIR")
    folder = Path(sys.argv[1])
    found = collect(folder)
    found.sort(key=lambda r: (r.get("pair", ""), r.get("dataset", ""), METHOD_ORDER.get(r.get("method"), 99)))
    print(write_table(found, folder, "comparison"))
