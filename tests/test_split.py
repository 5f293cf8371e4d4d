"""pipeline.daca_split reproduces sklearn's train_test_split (the split of the official DACA code),
also within each subject (split.by=subject), and per-subject results macro-average correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split

from helpers import pair_logits
from plmcal import pipeline
from plmcal.models import ModelSpec


@pytest.mark.parametrize("n", [4, 10, 12, 57, 100, 1000])
@pytest.mark.parametrize("seed", [0, 1, 5, 42])
def test_calibration_part(n, seed):
    train, _ = train_test_split(range(n), test_size=0.7, random_state=seed)
    calibration, _ = pipeline.daca_split(n, 0.7, seed)
    np.testing.assert_array_equal(calibration, np.asarray(train))


@pytest.mark.parametrize("n", [4, 10, 12, 57, 100, 1000])
@pytest.mark.parametrize("seed", [0, 1, 5, 42])
def test_test_part(n, seed):
    _, test = train_test_split(range(n), test_size=0.7, random_state=seed)
    _, ours = pipeline.daca_split(n, 0.7, seed)
    np.testing.assert_array_equal(ours, np.asarray(test))


@pytest.mark.parametrize("test_size", [0.3, 0.5])
def test_other_sizes(test_size):
    train, _ = train_test_split(range(37), test_size=test_size, random_state=3)
    calibration, _ = pipeline.daca_split(37, test_size, 3)
    np.testing.assert_array_equal(calibration, np.asarray(train))


@pytest.mark.parametrize("test_size", [0.0, 1.0, 1.5])
def test_bad_fraction(test_size):
    with pytest.raises(pipeline.PipelineError, match=str(test_size)):
        pipeline.daca_split(10, test_size, 1)


def test_too_few_rows():
    with pytest.raises(pipeline.PipelineError, match="1 questions"):
        pipeline.daca_split(1, 0.7, 1)


def readout(name: str, final: torch.Tensor) -> pipeline.Readout:
    n, k = final.shape
    tensors = {
        "final_option_logits": final,
        "final_logsumexp": torch.logsumexp(final, -1) + 0.5,
        "n_options": torch.full((n,), k),
        "greedy_is_option": torch.ones(n, dtype=torch.bool),
    }
    return pipeline.Readout(ModelSpec(name=name, source="local", path="/nowhere"), tensors, list(range(k)))


# --- split.by=subject: the same draw within each subject -------------------------------------------
def grouped(sizes: dict[str, int]) -> list[str]:
    """Subjects interleaved (a, b, c, a, b, ...) so that a group's positions are not contiguous."""
    queues = {name: count for name, count in sizes.items()}
    groups = []
    while any(queues.values()):
        for name in queues:
            if queues[name]:
                groups.append(name)
                queues[name] -= 1
    return groups


@pytest.mark.parametrize("seed", [1, 3])
def test_by_subject_matches_sklearn(seed):
    groups = grouped({"anatomy": 12, "virology": 7, "law": 30})
    calibration, test = pipeline.split_indices(len(groups), {"test_size": 0.7, "seed": seed, "by": "subject"}, groups)
    for subject in ("anatomy", "virology", "law"):
        positions = np.flatnonzero(np.asarray(groups) == subject)
        expected_calibration, expected_test = train_test_split(positions, test_size=0.7, random_state=seed)
        np.testing.assert_array_equal(calibration[np.isin(calibration, positions)], expected_calibration)
        np.testing.assert_array_equal(test[np.isin(test, positions)], expected_test)


def test_by_subject_partitions():
    groups = grouped({"a": 10, "b": 11})
    calibration, test = pipeline.split_indices(21, {"test_size": 0.7, "seed": 1, "by": "subject"}, groups)
    assert sorted(np.concatenate([calibration, test]).tolist()) == list(range(21))


def test_by_null_unchanged():
    calibration, _ = pipeline.split_indices(40, {"test_size": 0.7, "seed": 2, "by": None}, grouped({"a": 20, "b": 20}))
    np.testing.assert_array_equal(calibration, pipeline.daca_split(40, 0.7, 2)[0])


def test_by_invalid():
    with pytest.raises(pipeline.PipelineError, match="split.by='topic' is invalid"):
        pipeline.split_indices(10, {"by": "topic"}, ["a"] * 10)


def test_by_subject_too_small():
    groups = grouped({"big": 20, "tiny": 1})
    with pytest.raises(pipeline.PipelineError, match="subject 'tiny': 1 questions cannot be split"):
        pipeline.split_indices(len(groups), {"test_size": 0.7, "seed": 1, "by": "subject"}, groups)


def test_by_subject_needs_groups():
    with pytest.raises(pipeline.PipelineError, match="one subject per question"):
        pipeline.split_indices(10, {"by": "subject"}, None)


@pytest.fixture(scope="module")
def subject_result():
    plm, polm = pair_logits(5, n=90)
    labels = plm.argmax(1)
    groups = grouped({"anatomy": 30, "virology": 20, "law": 40})
    method = {"name": "vanilla", "fit": False}
    split = {"test_size": 0.7, "seed": 1, "by": "subject"}
    return pipeline.run_calibration(method, readout("plm", plm), readout("polm", polm), labels, split, seed=0, groups=groups), groups, labels


def test_subject_result_keys(subject_result):
    result, _, _ = subject_result
    assert set(result["per_subject"]) == {"anatomy", "virology", "law"}
    assert {"test_pooled", "test_uncalibrated_pooled", "plm_test_pooled"} <= set(result)


@pytest.mark.parametrize("key", ["test", "test_uncalibrated", "plm_test"])
def test_subject_macro_average(subject_result, key):
    result, _, _ = subject_result
    per_subject = [entry[key]["ece"] for entry in result["per_subject"].values()]
    assert result[key]["ece"] == pytest.approx(np.mean(per_subject))
    assert result[key]["n"] == result["n_test"]


def test_subject_metrics_recomputed(subject_result):
    # Each subject's ECE equals the metric computed on that subject's test questions alone.
    result, groups, labels = subject_result
    split = {"test_size": 0.7, "seed": 1, "by": "subject"}
    _, test = pipeline.split_indices(len(groups), split, groups)
    virology = [i for i in test.tolist() if groups[i] == "virology"]
    plm, polm = pair_logits(5, n=90)
    probs = pipeline.tempered_probs(polm[virology], 1.0)
    assert result["per_subject"]["virology"]["test"]["ece"] == pytest.approx(pipeline.evaluate(probs, labels[virology], 10)["ece"])


def test_run_job_rejects_split_by(tmp_path):
    from helpers import compose_config
    from plmcal.run import ConfigError, run_job

    cfg = compose_config(["split.by=topic", "logger=none"])
    with pytest.raises(ConfigError, match="split.by='topic' is invalid"):
        run_job(cfg, tmp_path)
