"""pipeline.daca_split reproduces sklearn's train_test_split (the split of the official DACA code)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from plmcal import pipeline


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
