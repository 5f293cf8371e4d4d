"""The committed ablation tables (experiments/results/ablations) are rebuilt exactly from the committed run folders."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT
from plmcal import aggregate

RESULTS = REPO_ROOT / "experiments" / "results" / "ablations"

pytestmark = pytest.mark.skipif(not (RESULTS / "runs").is_dir(), reason="no committed run folders under experiments/results/ablations/runs")


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO_ROOT / "experiments"))
    from collect_results import COMPARISONS

    out = tmp_path_factory.mktemp("rebuilt")
    previous = os.getcwd()
    os.chdir(REPO_ROOT)  # the tables name their source folder relative to the repository root
    try:
        aggregate.aggregate([Path("experiments/results/ablations/runs")], out, COMPARISONS, 1000)
    finally:
        os.chdir(previous)
    return out


@pytest.mark.parametrize("name", ["aggregate.md", "aggregate.csv"])
def test_tables_reproduced(rebuilt, name):
    assert (rebuilt / name).read_text() == (RESULTS / name).read_text()


def test_differences_reproduced(rebuilt):
    committed = json.loads((RESULTS / "aggregate.json").read_text())["differences"]
    assert json.loads((rebuilt / "aggregate.json").read_text())["differences"] == committed
