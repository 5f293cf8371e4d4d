"""The Hydra command line in a subprocess: a two-method multirun on the cross-family embedded pair."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import CROSS_PAIR, REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def multirun(embedded_cache, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("cli-outputs")
    command = [
        sys.executable, "-m", "plmcal.run", "-m",
        f"pair={CROSS_PAIR}", "dataset=arc_easy", "dataset.limit=12", "method=vanilla,daca", "logger=none",
        f"paths.output_dir={output_dir}", f"paths.cache_dir={embedded_cache}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540)
    return completed, output_dir


def test_exit_code(multirun):
    completed, _ = multirun
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_table_header(multirun):
    completed, _ = multirun
    headers = [line for line in completed.stdout.splitlines() if "ECE %" in line]
    assert len(headers) == 1, completed.stdout[-3000:]


def test_table_methods(multirun):
    completed, _ = multirun
    lines = completed.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if "ECE %" in line)
    method_column = [cell.strip() for cell in lines[first].split("|")].index("method")
    methods = [line.split("|")[method_column].strip() for line in lines[first + 2 : first + 4]]
    assert methods == ["vanilla", "daca"]


def test_comparison_files(multirun):
    _, output_dir = multirun
    assert len(list(output_dir.glob("multiruns/*/comparison.md"))) == 1


def test_job_results(multirun):
    _, output_dir = multirun
    assert len(list(output_dir.glob("multiruns/*/*/results.json"))) == 2
