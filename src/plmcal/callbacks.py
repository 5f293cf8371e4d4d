"""Hydra callbacks: the comparison table printed at the end of a multirun."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from plmcal import aggregate, report

log = logging.getLogger(__name__)


class ComparisonTable(Callback):
    """Collect every job's results.json of the sweep and write comparison.md / comparison.csv."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        results = report.collect(sweep_dir)
        errors = report.collect_errors(sweep_dir)
        for failure in errors:
            print(f"FAILED {failure['folder']}: {failure['error']}", flush=True)
        if not results:
            log.warning("No results.json under %s; no comparison table written.", sweep_dir)
            return
        results.sort(key=lambda r: (r.get("pair", ""), r.get("dataset", ""), report.METHOD_ORDER.get(r.get("method"), 99)))
        text = report.write_table(results, sweep_dir, "comparison")
        failed = f", {len(errors)} failed (listed above)" if errors else ""
        print(f"\nComparison of {len(results)} jobs{failed} (test split; written to {sweep_dir}/comparison.md):\n{text}\n", flush=True)
        if len({r.get("split_seed") for r in results}) > 1:
            # Several splits: the mean ± std table with bootstrap intervals, as `python -m plmcal.aggregate` writes it.
            settings = config.get("aggregate") or {}
            comparisons = [aggregate.parse_comparison(text) for text in settings.get("compare") or []]
            aggregate.aggregate([sweep_dir], sweep_dir, comparisons, int(settings.get("resamples", 1000)))
            print(f"Mean ± std over splits with bootstrap intervals: {sweep_dir}/aggregate.md", flush=True)
