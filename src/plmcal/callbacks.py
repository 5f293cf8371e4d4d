"""Hydra callbacks: the comparison table printed at the end of a multirun."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from plmcal import report

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
