"""Sweeps through the joblib and submitit_local launcher configs, on a tiny local model pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

pytestmark = pytest.mark.slow
LAUNCHERS = ("joblib", "submitit_local")
METHODS = ("vanilla", "ts_oracle")


@pytest.fixture(scope="module")
def sweeps(tiny_model_dir, embedded_cache, tmp_path_factory) -> dict:
    """Run both sweeps at once (each starts several Python processes) and return (process, output dir)."""
    pair = [
        "pair.name=tiny", "pair.polm.adapter=null",
        "pair.plm.source=local", f"+pair.plm.path={tiny_model_dir}", "pair.plm.name=tiny-plm",
        "pair.polm.source=local", f"+pair.polm.path={tiny_model_dir}", "pair.polm.name=tiny-polm",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    running = {}
    for launcher in LAUNCHERS:
        output_dir = tmp_path_factory.mktemp(f"sweep-{launcher}")
        command = [
            sys.executable, "-m", "plmcal.run", "-m", f"hydra/launcher={launcher}", *pair,
            "dataset=arc_easy", "dataset.limit=12", f"method={','.join(METHODS)}", "logger=none",
            f"paths.output_dir={output_dir}", f"paths.cache_dir={embedded_cache}",
        ]
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running[launcher] = (process, output_dir)
    finished = {}
    for launcher, (process, output_dir) in running.items():
        stdout, stderr = process.communicate(timeout=540)
        finished[launcher] = (process.returncode, stdout, stderr, output_dir)
    return finished


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sweep_exit_code(sweeps, launcher):
    returncode, _, stderr, _ = sweeps[launcher]
    assert returncode == 0, stderr[-3000:]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sweep_no_errors(sweeps, launcher):
    *_, output_dir = sweeps[launcher]
    assert list(output_dir.glob("multiruns/*/*/error.json")) == []


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sweep_one_folder_per_cell(sweeps, launcher):
    *_, output_dir = sweeps[launcher]
    methods = sorted(json.loads(path.read_text())["method"] for path in output_dir.glob("multiruns/*/*/results.json"))
    assert methods == sorted(METHODS)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sweep_comparison_table(sweeps, launcher):
    """The ComparisonTable callback runs in the launching process after the workers return."""
    _, stdout, _, output_dir = sweeps[launcher]
    assert len(list(output_dir.glob("multiruns/*/comparison.md"))) == 1
    assert "Comparison of 2 jobs" in stdout


def test_launcher_configs_compose(compose):
    for launcher in (*LAUNCHERS, "submitit_slurm"):
        cfg = compose([f"hydra/launcher={launcher}"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.startswith("hydra_plugins."), launcher
