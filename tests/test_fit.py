"""module.fit_temperature: DACA faithful mode against a re-implementation of the official loop,
robust mode against faithful mode, and the labelled oracle against a scalar minimiser."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from scipy.optimize import minimize_scalar
from torch.testing import assert_close

from helpers import compose_config, official_fit, pair_logits
from plmcal import losses, module


def method_config(name: str) -> dict:
    return OmegaConf.to_container(compose_config([f"method={name}"]).method, resolve=True)


def fit_tensors(plm: torch.Tensor, polm: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    n = plm.shape[0]
    empty = torch.zeros(n, 1, 1)
    return {
        "plm_final": plm,
        "polm_final": polm,
        "labels": plm.argmax(1) if labels is None else labels,
        "plm_lens": empty,
        "polm_lens": empty,
        "pdl": torch.zeros(n, dtype=torch.long),
    }


def scalar_minimum(loss, low: float = 0.05, high: float = 20.0) -> float:
    """T minimising a loss of one temperature (bounded Brent search), independent of Lightning."""
    found = minimize_scalar(lambda t: float(loss(torch.tensor(t, dtype=torch.float32))), bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    return float(found.x)


@pytest.fixture(scope="module")
def calibration_set() -> tuple[torch.Tensor, torch.Tensor]:
    # 300 rows: two mini-batches (256 + 44) per epoch, so the shuffling order matters.
    return pair_logits(20, n=300, k=4)


@pytest.fixture(scope="module")
def faithful_fit(calibration_set) -> tuple[float, list[float]]:
    return module.fit_temperature(method_config("daca_faithful"), fit_tensors(*calibration_set), seed=0)


@pytest.fixture(scope="module")
def robust_t(calibration_set) -> float:
    temperature, _ = module.fit_temperature(method_config("daca"), fit_tensors(*calibration_set), seed=0)
    return temperature


def test_faithful_settings():
    method = method_config("daca_faithful")
    assert {k: method[k] for k in module.DACA_FAITHFUL} == module.DACA_FAITHFUL


def test_faithful_official(faithful_fit, calibration_set):
    expected = official_fit(*calibration_set, seed=0)
    assert_close(torch.tensor(faithful_fit[0]), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_faithful_steps(faithful_fit):
    # The initial full-set loss, 400 epochs of 2 mini-batches, then the final full-set loss.
    assert len(faithful_fit[1]) == 802


def test_faithful_final_loss(faithful_fit, calibration_set):
    temperature, step_losses = faithful_fit
    expected = losses.daca_loss_faithful(*calibration_set, torch.tensor(temperature))
    assert_close(torch.tensor(step_losses[-1]), expected, rtol=1e-6, atol=1e-6)


def test_faithful_overconfident(faithful_fit):
    # The PoLM logits are about 3x the PLM's, so the fitted T must be well above 1.
    assert faithful_fit[0] > 1.5


def test_robust_not_worse(robust_t, faithful_fit, calibration_set):
    robust_loss = float(losses.daca_loss_faithful(*calibration_set, torch.tensor(robust_t)))
    faithful_loss = float(losses.daca_loss_faithful(*calibration_set, torch.tensor(faithful_fit[0])))
    assert robust_loss <= faithful_loss + 1e-5


def test_robust_minimum(robust_t, calibration_set):
    plm, polm = calibration_set
    expected = scalar_minimum(lambda t: losses.daca_loss(plm, polm, t))
    assert robust_t == pytest.approx(expected, rel=1e-3)


def test_oracle_minimum(calibration_set):
    plm, polm = calibration_set
    labels = plm.argmax(1)
    oracle_t, _ = module.fit_temperature(method_config("ts_oracle"), fit_tensors(plm, polm, labels), seed=0)
    expected = scalar_minimum(lambda t: losses.nll_loss(polm, labels, t))
    assert oracle_t == pytest.approx(expected, rel=1e-3)


def test_match_all_minimum(calibration_set):
    plm, polm = calibration_set
    temperature, _ = module.fit_temperature(method_config("match_all"), fit_tensors(plm, polm), seed=0)
    expected = scalar_minimum(lambda t: losses.match_all_loss(plm, polm, t))
    assert temperature == pytest.approx(expected, rel=1e-3)


def test_loader_seeded():
    tensors = fit_tensors(*pair_logits(21, n=10))
    first = [batch[2].tolist() for batch in module.make_loader(tensors, 4, seed=3)]
    second = [batch[2].tolist() for batch in module.make_loader(tensors, 4, seed=3)]
    assert first == second


def test_loader_full_batch():
    tensors = fit_tensors(*pair_logits(22, n=10))
    assert len(module.make_loader(tensors, None, seed=0)) == 1


def test_loader_bad_size():
    tensors = fit_tensors(*pair_logits(22, n=10))
    with pytest.raises(ValueError, match="batch_size=0"):
        module.make_loader(tensors, 0, seed=0)


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf])
def test_bad_init(value):
    with pytest.raises(ValueError, match="init_temperature"):
        module.TemperatureCalibrator({"loss": "daca", "init_temperature": value})


def test_bad_optimizer(calibration_set):
    method = {**method_config("daca"), "optimizer": "rmsprop"}
    with pytest.raises(ValueError, match="'rmsprop'"):
        module.fit_temperature(method, fit_tensors(*calibration_set), seed=0)


def test_bad_parametrization():
    with pytest.raises(ValueError, match="'softplus'"):
        module.TemperatureCalibrator({"loss": "daca", "parametrization": "softplus"})


def test_optimizer_kwargs_passed():
    from plmcal.module import build_optimizer

    optimizer = build_optimizer({"optimizer": "adam", "lr": 0.1, "optimizer_kwargs": {"betas": [0.5, 0.9]}}, [torch.nn.Parameter(torch.zeros(()))])
    assert tuple(optimizer.param_groups[0]["betas"]) == (0.5, 0.9)


def test_optimizer_kwargs_unknown():
    from plmcal.module import validate_method

    with pytest.raises(ValueError, match="optimizer_kwargs"):
        validate_method({"name": "x", "loss": "daca", "optimizer": "sgd", "lr": 0.1, "optimizer_kwargs": {"beta": 3}})


def test_optimizer_kwargs_no_lr():
    from plmcal.module import validate_method

    with pytest.raises(ValueError, match="set method.lr"):
        validate_method({"name": "x", "loss": "daca", "optimizer": "adam", "lr": 0.1, "optimizer_kwargs": {"lr": 1.0}})


# --- the one-step fast path (no Trainer) against the Trainer ---------------------------------------
@pytest.mark.parametrize("name", ["daca", "ts_oracle", "match_all"])
def test_single_step_equals_trainer(name, calibration_set):
    plm, polm = calibration_set
    tensors = fit_tensors(plm, polm, labels=torch.arange(plm.shape[0]) % plm.shape[1])
    method = method_config(name)
    direct_t, direct_losses = module.fit_temperature(method, tensors, seed=0)
    trainer_t, trainer_losses = module.fit_temperature(method | {"fit_loop": "trainer"}, tensors, seed=0)
    # Same module, optimiser and full batch: only the order of the float32 sums may differ.
    assert_close(direct_t, trainer_t, rtol=1e-5, atol=1e-6)
    assert_close(direct_losses[-1], trainer_losses[-1], rtol=1e-5, atol=1e-7)


def test_single_step_loss_count(calibration_set):
    _, fitted = module.fit_temperature(method_config("daca"), fit_tensors(*calibration_set), seed=0)
    assert len(fitted) == 3  # initial, the one L-BFGS step, final


def test_bad_fit_loop(calibration_set):
    with pytest.raises(ValueError, match="method.fit_loop='fast'"):
        module.fit_temperature(method_config("daca") | {"fit_loop": "fast"}, fit_tensors(*calibration_set), seed=0)
