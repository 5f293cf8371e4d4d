"""Vector and matrix scaling: the calibrated logits against a per-question reference, absent options,
the fitted oracles against scipy's minimiser of the same loss, and the argmax-change flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.optimize import minimize
from torch.testing import assert_close

from helpers import compose_config, pair_logits, with_absent
from plmcal import losses, models, module, pipeline


def method_config(name: str, **overrides) -> dict:
    return OmegaConf.to_container(compose_config([f"method={name}"]).method, resolve=True) | overrides


def fit_tensors(plm: torch.Tensor, polm: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    n = plm.shape[0]
    empty = torch.zeros(n, 1, 1)
    return {"plm_final": plm, "polm_final": polm, "labels": labels, "plm_lens": empty, "polm_lens": empty, "pdl": torch.zeros(n, dtype=torch.long)}


def reference_scaled(logits: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Scale each question on its own k present options, with numpy, then pad with -inf."""
    out = torch.full_like(logits, float("-inf"))
    for n, row in enumerate(logits):
        k = int(torch.isfinite(row).sum())
        z = row[:k].numpy().astype(np.float64)
        z = z - np.log(np.exp(z - z.max()).sum()) - z.max()  # log-softmax over the present options
        w, b = weight.numpy().astype(np.float64), bias.numpy().astype(np.float64)
        scaled = z * w[:k] + b[:k] if kind == "vector" else w[:k, :k] @ z + b[:k]
        out[n, :k] = torch.from_numpy(scaled).float()
    return out


@pytest.mark.parametrize("kind", ["vector", "matrix"])
def test_scale_matches_reference(kind):
    generator = torch.Generator().manual_seed(3)
    logits = with_absent(torch.randn(6, 5, generator=generator) * 3, [5, 4, 3, 2, 5, 4])
    weight = torch.randn(5, generator=generator) if kind == "vector" else torch.randn(5, 5, generator=generator)
    bias = torch.randn(5, generator=generator)
    ours = losses.scale_logits(logits, kind, weight, bias)
    assert_close(ours, reference_scaled(logits, kind, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["vector", "matrix"])
def test_identity_keeps_probs(kind):
    logits = with_absent(pair_logits(4, n=8, k=4)[1], [4, 3, 2, 4, 4, 3, 2, 4])
    weight = torch.ones(4) if kind == "vector" else torch.eye(4)
    scaled = losses.scale_logits(logits, kind, weight, torch.zeros(4))
    assert_close(torch.softmax(losses.fill_absent(scaled), -1), torch.softmax(losses.fill_absent(logits), -1), rtol=1e-6, atol=1e-7)


def test_absent_options_zero_prob():
    logits = with_absent(torch.randn(3, 4), [2, 3, 4])
    scaled = losses.scale_logits(logits, "matrix", torch.randn(4, 4), torch.randn(4))
    probs = torch.softmax(losses.fill_absent(scaled), -1)
    assert probs[0, 2:].sum().item() == 0.0
    assert probs[1, 3].item() == 0.0


def test_absent_options_no_nan_grad():
    logits = with_absent(torch.randn(4, 4), [2, 3, 4, 4])
    weight = torch.eye(4, requires_grad=True)
    bias = torch.zeros(4, requires_grad=True)
    loss = losses.nll_loss_scaled(losses.scale_logits(logits, "matrix", weight, bias), torch.tensor([1, 2, 3, 0]))
    loss.backward()
    assert torch.isfinite(weight.grad).all()
    assert torch.isfinite(bias.grad).all()


@pytest.mark.parametrize("kind,count", [("temperature", 1), ("vector", 8), ("matrix", 20)])
def test_parameter_count(kind, count):
    assert losses.scaling_parameter_count(kind, 4) == count


def test_parameter_count_bad_kind():
    with pytest.raises(ValueError, match="'platt'"):
        losses.scaling_parameter_count("platt", 4)


def scipy_minimum(loss_of, size: int, start: np.ndarray) -> np.ndarray:
    """Minimise loss_of(theta) (torch, float64) with scipy's BFGS and exact gradients."""
    def value_and_grad(theta):
        t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        value = loss_of(t)
        (grad,) = torch.autograd.grad(value, t)
        return float(value.detach()), grad.numpy()

    return minimize(value_and_grad, start, jac=True, method="BFGS", options={"gtol": 1e-9, "maxiter": 2000}).x


@pytest.fixture(scope="module")
def oracle_data():
    generator = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 3, (120,), generator=generator)
    plm = torch.randn(120, 3, generator=generator) + 1.2 * torch.nn.functional.one_hot(labels, 3)
    polm = 4.0 * plm + torch.randn(120, 3, generator=generator) + torch.tensor([1.5, 0.0, -1.0])  # over-confident and biased towards A
    return plm, polm, labels


def test_vector_oracle_minimum(oracle_data):
    plm, polm, labels = oracle_data
    # Full-batch L-BFGS on the convex vector-scaling NLL, compared with scipy on the same loss.
    method = method_config("vs_oracle", optimizer="lbfgs", lr=0.5, epochs=1, batch_size=None, max_iter=500)
    fitted, _ = module.fit_calibrator(method, fit_tensors(plm, polm, labels), seed=0)
    expected = scipy_minimum(
        lambda t: losses.nll_loss_scaled(losses.scale_logits(polm.double(), "vector", t[:3], t[3:]), labels), 6, np.r_[np.ones(3), np.zeros(3)]
    )
    ours_loss = float(losses.nll_loss_scaled(losses.scale_logits(polm.double(), "vector", fitted.weight.double(), fitted.bias.double()), labels))
    best_loss = float(losses.nll_loss_scaled(losses.scale_logits(polm.double(), "vector", torch.tensor(expected[:3]), torch.tensor(expected[3:])), labels))
    assert ours_loss == pytest.approx(best_loss, abs=1e-5)


def test_matrix_daca_minimum(oracle_data):
    plm, polm, labels = oracle_data
    method = method_config("daca_matrix", optimizer="lbfgs", lr=0.5, epochs=1, batch_size=None, max_iter=500)
    fitted, step_losses = module.fit_calibrator(method, fit_tensors(plm, polm, labels), seed=0)
    expected = scipy_minimum(
        lambda t: losses.daca_loss_scaled(plm.double(), polm.double(), losses.scale_logits(polm.double(), "matrix", t[:9].reshape(3, 3), t[9:])),
        12, np.r_[np.eye(3).ravel(), np.zeros(3)],
    )
    best = float(losses.daca_loss_scaled(plm.double(), polm.double(), losses.scale_logits(polm.double(), "matrix", torch.tensor(expected[:9]).reshape(3, 3), torch.tensor(expected[9:]))))
    assert step_losses[-1] == pytest.approx(best, abs=1e-5)


def test_daca_scaled_uses_agreement(oracle_data):
    # Rows where PLM and PoLM disagree must not move the loss.
    plm, polm, _ = oracle_data
    scaled = losses.scale_logits(polm, "vector", torch.full((3,), 0.5), torch.zeros(3))
    agree = losses.agreement(plm, polm)
    assert not bool(agree.all())
    expected = losses.kl_divergence(losses.masked_log_softmax(plm[agree]), losses.masked_log_softmax(scaled[agree])).mean()
    assert_close(losses.daca_loss_scaled(plm, polm, scaled), expected)


def test_vector_equals_temperature():
    # Vector scaling with w = 1/T and b = 0 is temperature scaling.
    plm, polm = pair_logits(9)
    scaled = losses.scale_logits(polm, "vector", torch.full((4,), 1 / 2.5), torch.zeros(4))
    assert_close(losses.daca_loss_scaled(plm, polm, scaled), losses.daca_loss(plm, polm, torch.tensor(2.5)), rtol=1e-5, atol=1e-6)


def test_scaling_rejects_faithful():
    with pytest.raises(ValueError, match="mode=faithful"):
        module.validate_method(method_config("daca_vector", mode="faithful"))


def test_scaling_rejects_dual_align():
    with pytest.raises(ValueError, match="calibrator=matrix"):
        module.validate_method(method_config("dual_align", calibrator="matrix"))


def test_fit_temperature_rejects_vector(oracle_data):
    with pytest.raises(ValueError, match="fit_calibrator"):
        module.fit_temperature(method_config("vs_oracle"), fit_tensors(*oracle_data), seed=0)


def readout(name: str, final: torch.Tensor) -> pipeline.Readout:
    n, k = final.shape
    tensors = {
        "final_option_logits": final,
        "final_logsumexp": torch.logsumexp(final, dim=-1) + 1.0,
        "greedy_is_option": torch.ones(n, dtype=torch.bool),
        "n_options": torch.full((n,), k),
    }
    return pipeline.Readout(models.ModelSpec(name=name, source="local", path="."), tensors, list(range(k)))


def test_vector_changes_predictions(oracle_data):
    # The PoLM's bias towards option A is a shift vector scaling can undo, so some answers change
    # and the pipeline reports them instead of raising.
    plm, polm, labels = oracle_data
    method = method_config("vs_oracle", epochs=100)
    result = pipeline.run_calibration(method, readout("plm", plm), readout("polm", polm), labels, {"test_size": 0.7, "seed": 1}, seed=0)
    assert result["diagnostics"]["prediction_changed_rate"] > 0
    assert result["temperature"] is None
    assert result["calibrator"]["n_params"] == 6


def test_temperature_change_raises(oracle_data, monkeypatch):
    # A temperature method whose calibrator changes an answer is a bug and must raise.
    plm, polm, labels = oracle_data
    monkeypatch.setattr(pipeline, "apply_calibrator", lambda calibrator, logits: torch.softmax(-logits.double(), dim=-1))
    with pytest.raises(pipeline.PipelineError, match="changed a prediction"):
        pipeline.run_calibration(method_config("ts_oracle"), readout("plm", plm), readout("polm", polm), labels, {"test_size": 0.7, "seed": 1}, seed=0)
