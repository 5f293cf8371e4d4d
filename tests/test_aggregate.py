"""aggregate.py on sweeps written by the real pipeline and result writer (synthetic read-outs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import DACA_LBFGS, VANILLA, write_synthetic_sweep
from plmcal import aggregate, metrics

SEEDS = [1, 2, 3]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    write_synthetic_sweep(folder, [VANILLA, DACA_LBFGS], SEEDS, datasets=("toy_a", "toy_b"))
    write_synthetic_sweep(folder / "lam", [DACA_LBFGS], SEEDS[:2], datasets=("toy_a",), overrides=["method.lr=0.25"])
    return folder


@pytest.fixture(scope="module")
def groups(sweep):
    return aggregate.group_jobs(aggregate.load_jobs([sweep]))


def _group(groups, dataset, label):
    return next(g for g in groups if g.dataset == dataset and g.label == label)


def test_batched_ece_matches_metrics():
    generator = torch.Generator().manual_seed(3)
    confidence = torch.rand(5, 300, generator=generator).double()
    confidence[0, :3] = 1.0  # exactly 1.0 must land in the last bin
    correct = (torch.rand(5, 300, generator=generator) < confidence).double()
    expected = [metrics.ece(confidence[i], correct[i]) for i in range(5)]
    np.testing.assert_allclose(aggregate.batched_ece(confidence.numpy(), correct.numpy()), expected, rtol=1e-12)


def test_groups_split_seeds(groups):
    group = _group(groups, "toy_a", "daca")
    assert sorted(job.split_seed for job in group.jobs) == SEEDS


def test_groups_setting_apart(groups):
    group = _group(groups, "toy_a", "daca [method.lr=0.25]")
    assert len(group.jobs) == 2


def test_group_count(groups):
    # 2 datasets x 2 methods, plus the lr variant on one dataset.
    assert len(groups) == 5


def test_mean_std(groups):
    group = _group(groups, "toy_b", "daca")
    row = aggregate.summarize_group(group, n_resamples=50)
    values = [100 * job.result["test"]["ece"] for job in group.jobs]
    assert row["ECE %"]["mean"] == pytest.approx(np.mean(values))
    assert row["ECE %"]["std"] == pytest.approx(np.std(values, ddof=1))


def test_single_job_no_std(groups):
    row = aggregate.summarize_group(aggregate.Group("p", "d", "x", "m", "", _group(groups, "toy_a", "daca").jobs[:1]), n_resamples=20)
    assert np.isnan(row["ECE %"]["std"])


def test_interval_ordered(groups):
    low, high = aggregate.bootstrap_mean_ece(_group(groups, "toy_a", "vanilla").jobs, n_resamples=200)
    assert 0.0 <= low < high <= 1.0


def test_interval_seeded(groups):
    jobs = _group(groups, "toy_a", "vanilla").jobs
    assert aggregate.bootstrap_mean_ece(jobs, n_resamples=100, seed=4) == aggregate.bootstrap_mean_ece(jobs, n_resamples=100, seed=4)


def test_interval_needs_predictions(groups):
    jobs = _group(groups, "toy_a", "vanilla").jobs
    bare = [aggregate.Job(job.folder, job.result, None) for job in jobs]
    assert aggregate.bootstrap_mean_ece(bare) is None


def test_paired_self_zero(groups):
    group = _group(groups, "toy_a", "daca")
    diff = aggregate.paired_difference(group, group, n_resamples=100)
    assert diff["delta"] == 0.0
    assert diff["low"] == diff["high"] == 0.0


def test_paired_sign(groups):
    # DACA lowers the over-confident PoLM's ECE on this synthetic pair, so daca - vanilla < 0.
    diff = aggregate.paired_difference(_group(groups, "toy_a", "vanilla"), _group(groups, "toy_a", "daca"), n_resamples=200)
    assert diff["high"] < 0.0
    assert diff["n_splits"] == 3


def test_paired_rejects_other_questions(groups):
    vanilla = _group(groups, "toy_a", "vanilla")
    job = vanilla.jobs[0]
    shifted = dict(job.predictions, test_index=job.predictions["test_index"] + 1)
    other = aggregate.Group("synthetic", "toy_a", "toy@v1", "x", "", [aggregate.Job(job.folder, job.result, shifted)])
    with pytest.raises(ValueError, match="different test questions"):
        aggregate.paired_difference(vanilla, other, n_resamples=10)


def test_cli_writes_tables(sweep, tmp_path, capsys):
    aggregate.main([str(sweep), "--out", str(tmp_path), "--resamples", "50", "--compare", "vanilla:daca"])
    printed = capsys.readouterr().out
    assert "## Paired differences" in printed
    assert (tmp_path / "aggregate.csv").read_text().count("\n") == 6  # header + 5 groups
    assert len(json.loads((tmp_path / "aggregate.json").read_text())["differences"]) == 2


def test_cli_reproducible(sweep, tmp_path):
    first = aggregate.aggregate([sweep], tmp_path / "a", n_resamples=50)
    second = aggregate.aggregate([sweep], tmp_path / "b", n_resamples=50)
    assert first.replace(str(tmp_path / "a"), "") == second.replace(str(tmp_path / "b"), "")


def test_cli_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        aggregate.main([str(tmp_path / "nope")])


def test_cli_bad_compare(sweep):
    with pytest.raises(SystemExit):
        aggregate.main([str(sweep), "--compare", "daca"])


def test_empty_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        aggregate.aggregate([tmp_path], tmp_path)
