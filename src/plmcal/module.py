"""LightningModule that learns a calibrator for the PoLM from the pair's cached read-outs.

The calibrator is one temperature (every method's default), or vector or matrix scaling
(``method.calibrator``), which DACA's paper combines with its agreement mask.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from plmcal import losses

log = logging.getLogger(__name__)

# Field order of the tensors in each batch.
FIELDS = ("plm_final", "polm_final", "labels", "plm_lens", "polm_lens", "pdl", "plm_support", "polm_support")

# Settings of the official DACA optimisation loop (calibration/optimization.py of the DACA code).
DACA_FAITHFUL = {"parametrization": "raw", "init_temperature": 1.0, "optimizer": "adam", "lr": 0.1, "epochs": 400, "batch_size": 256}


CHOICES = {
    "loss": ("none", "nll", "daca", "match_all", "dual_align"),
    "optimizer": ("adam", "sgd", "lbfgs"),
    "parametrization": ("log", "raw"),
    "mode": ("robust", "faithful"),
    "temperature_scope": ("all_post_pdl", "final_only"),
    "ise_aggregation": ("mean_sq_diff", "sum_sq_diff", "diff_of_means"),
    "weighting": losses.WEIGHTINGS,
    "weight_fn": losses.WEIGHT_FUNCTIONS,
    "terms": ("both", "confidence", "process"),
    "support": losses.SUPPORTS,
    "calibrator": losses.SCALINGS,
    "ensemble": (None, "cape"),
    "fit_loop": ("auto", "trainer"),
}

# Losses that vector and matrix scaling support: the final-layer ones.
SCALED_LOSSES = ("nll", "daca", "match_all")


def changes_predictions(method: dict[str, Any]) -> bool:
    """True for methods whose calibrated PoLM may predict another option than the raw PoLM.

    A positive temperature keeps the argmax; vector and matrix scaling and the CAPE ensemble do not.
    """
    return method.get("calibrator", "temperature") != "temperature" or method.get("ensemble") is not None


def validate_method(method: dict[str, Any]) -> None:
    """Raise on any invalid method setting, so that a typo fails before the forward passes."""
    name = method.get("name", "?")
    for key, allowed in CHOICES.items():
        if key in method and method[key] not in allowed:
            raise ValueError(f"method.{key}={method[key]!r} is invalid for method {name!r}; use one of {list(allowed)}.")
    calibrator = method.get("calibrator", "temperature")
    if calibrator != "temperature":
        if method.get("loss") not in SCALED_LOSSES:
            raise ValueError(
                f"method.calibrator={calibrator} is invalid with method.loss={method.get('loss')!r} for method {name!r}; "
                f"vector and matrix scaling support the losses {list(SCALED_LOSSES)}."
            )
        if method.get("mode", "robust") == "faithful":
            raise ValueError(
                f"method.mode=faithful is invalid with method.calibrator={calibrator} for method {name!r}: the official "
                "DACA code fits only a temperature. Use method.mode=robust."
            )
    permutations = method.get("permutations")
    if permutations is not None and (not isinstance(permutations, int) or isinstance(permutations, bool) or permutations < 1):
        raise ValueError(f"method.permutations={permutations!r} is invalid for method {name!r}; use a whole number >= 1 or null (all shifts).")
    if method.get("ensemble") is not None and method.get("fit", True):
        raise ValueError(f"method.ensemble={method['ensemble']} fits nothing; set method.fit=false for method {name!r}.")
    if not method.get("fit", True):
        return
    checks = {
        "lr": lambda v: float(v) > 0,
        "epochs": lambda v: int(v) >= 1 and int(v) == float(v),
        "init_temperature": lambda v: math.isfinite(float(v)) and float(v) > 0,
        "max_temperature": lambda v: float(v) > float(method.get("init_temperature", 1.0)),
        "lam": lambda v: math.isfinite(float(v)) and float(v) >= 0,
        "max_iter": lambda v: int(v) >= 1,
    }
    for key, check in checks.items():
        if key in method and method[key] is not None:
            try:
                valid = check(method[key])
            except (TypeError, ValueError):
                valid = False
            if not valid:
                raise ValueError(
                    f"method.{key}={method[key]!r} is invalid for method {name!r}: lr must be > 0, epochs and "
                    "max_iter whole numbers >= 1, init_temperature > 0, max_temperature above it, lam >= 0."
                )
    kwargs = method.get("optimizer_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"method.optimizer_kwargs={kwargs!r} is invalid; use a mapping such as {{betas: [0.9, 0.999]}}.")
    if "lr" in kwargs or "params" in kwargs:
        raise ValueError("method.optimizer_kwargs must not hold lr or params; set method.lr instead.")
    build_optimizer(method, [torch.nn.Parameter(torch.zeros(()))])  # unknown optimizer_kwargs fail here
    batch_size = method.get("batch_size")
    if batch_size is not None and (int(batch_size) < 1 or int(batch_size) != float(batch_size)):
        raise ValueError(f"method.batch_size={batch_size!r} is invalid; use a positive whole number or null (full batch).")


class Calibrator(L.LightningModule):
    """Holds the learnable calibrator and computes the configured method's loss on a batch.

    ``method.calibrator`` selects temperature (1 parameter), vector (2K) or matrix (K^2 + K)
    scaling, where K = ``n_columns``, the option columns of the read-out. A temperature uses
    parametrization="log" (learns log T, so T stays positive) or "raw" (learns T itself with no
    constraint, as the official DACA code does). Vector and matrix scaling start at the identity
    (w = 1 or W = I, b = 0), where they reproduce the uncalibrated probabilities.
    """

    def __init__(self, method: dict[str, Any], n_columns: int | None = None):
        super().__init__()
        validate_method(method)
        self.save_hyperparameters({"method": method, "n_columns": n_columns})
        self.method = method
        self.kind = method.get("calibrator", "temperature")
        init = float(method.get("init_temperature", 1.0))
        # With log T, T is capped: on near-chance data the losses keep falling as T grows, and a T of
        # 1e6 makes float32 softmax outputs tie. The cap is reported when reached.
        self.log_max_temperature = math.log(float(method.get("max_temperature") or 1e4))
        self.parametrization = method.get("parametrization", "log")
        if self.kind != "temperature":
            if n_columns is None or int(n_columns) < 2:
                raise ValueError(f"method.calibrator={self.kind} needs the number of option columns (>= 2), got {n_columns!r}.")
            k = int(n_columns)
            self.weight = torch.nn.Parameter(torch.ones(k) if self.kind == "vector" else torch.eye(k))
            self.bias = torch.nn.Parameter(torch.zeros(k))
        elif self.parametrization == "log":
            self.raw = torch.nn.Parameter(torch.tensor(math.log(init)))
        elif self.parametrization == "raw":
            self.raw = torch.nn.Parameter(torch.tensor(init))
        else:
            raise ValueError(f"method.parametrization={self.parametrization!r} is invalid; use 'log' or 'raw'.")
        self.automatic_optimization = True

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def temperature(self) -> torch.Tensor:
        if self.kind != "temperature":
            raise AttributeError(f"a {self.kind} calibrator has no temperature.")
        if self.parametrization == "log":
            return self.raw.clamp(max=self.log_max_temperature).exp()
        return self.raw

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kind != "temperature":
            return self._scaled_loss(batch), {}
        kind, t = self.method["loss"], self.temperature
        if kind == "nll":
            return losses.nll_loss(batch["polm_final"], batch["labels"], t), {}
        if kind == "daca":
            if self.method.get("mode", "robust") == "faithful":
                return losses.daca_loss_faithful(batch["plm_final"], batch["polm_final"], t), {}
            return losses.daca_loss(batch["plm_final"], batch["polm_final"], t), {}
        if kind == "match_all":
            return losses.match_all_loss(batch["plm_final"], batch["polm_final"], t), {}
        if kind == "dual_align":
            return losses.dual_align_loss(
                batch["plm_lens"],
                batch["polm_lens"],
                t,
                lam=float(self.method["lam"]),
                temperature_scope=self.method["temperature_scope"],
                ise_aggregation=self.method["ise_aggregation"],
                weighting=self.method["weighting"],
                weight_fn=self.method["weight_fn"],
                pdl=batch["pdl"],
                terms=self.method.get("terms", "both"),
                plm_support=batch.get("plm_support"),
                polm_support=batch.get("polm_support"),
            )
        raise ValueError(f"method.loss={kind!r} is invalid; use nll, daca, match_all or dual_align.")

    def _scaled_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scaled = losses.scale_logits(batch["polm_final"], self.kind, self.weight, self.bias)  # (B, K)
        kind = self.method["loss"]
        if kind == "nll":
            return losses.nll_loss_scaled(scaled, batch["labels"])
        if kind == "daca":
            return losses.daca_loss_scaled(batch["plm_final"], batch["polm_final"], scaled)
        if kind == "match_all":
            return losses.match_all_loss_scaled(batch["plm_final"], scaled)
        raise ValueError(f"method.loss={kind!r} is invalid with calibrator={self.kind}; use one of {list(SCALED_LOSSES)}.")

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        named = dict(zip(FIELDS, batch))
        loss, parts = self.loss(named)
        if self.logger is None:
            return loss  # self.log costs about 1 ms per call and nothing would read the values
        size = named["labels"].shape[0]
        self.log("fit/loss", loss, on_step=True, on_epoch=False, batch_size=size)
        if self.kind == "temperature":
            self.log("fit/temperature", self.temperature.detach(), on_step=True, on_epoch=False, batch_size=size)
        for name, value in parts.items():
            self.log(f"fit/{name}", value, on_step=True, on_epoch=False, batch_size=size)
        return loss

    def configure_optimizers(self):
        return build_optimizer(self.method, list(self.parameters()))

    def fitted(self) -> "FittedCalibrator":
        if self.kind == "temperature":
            return FittedCalibrator("temperature", temperature=float(self.temperature.detach()))
        return FittedCalibrator(self.kind, weight=self.weight.detach().clone(), bias=self.bias.detach().clone())


# The class's name before vector and matrix scaling existed; kept for existing callers.
TemperatureCalibrator = Calibrator


@dataclass
class FittedCalibrator:
    """A fitted calibrator: a temperature, or the weight (K,) or (K, K) and bias (K,) of vector/matrix scaling."""

    kind: str
    temperature: float | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def n_params(self) -> int:
        if self.kind == "temperature":
            return 1
        return int(self.weight.numel() + self.bias.numel())

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: kind, parameter count and the fitted values."""
        out: dict[str, Any] = {"kind": self.kind, "n_params": self.n_params}
        if self.kind == "temperature":
            out["temperature"] = self.temperature
        else:
            out["weight"] = self.weight.tolist()
            out["bias"] = self.bias.tolist()
        return out


def build_optimizer(method: dict[str, Any], params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Build the configured optimiser; ``method.optimizer_kwargs`` passes extra settings (betas, momentum, ...)."""
    name, lr = method["optimizer"], float(method["lr"])
    kwargs = dict(method.get("optimizer_kwargs") or {})
    if name == "lbfgs":
        kwargs = {"max_iter": int(method.get("max_iter", 100)), "line_search_fn": "strong_wolfe"} | kwargs
    classes = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "lbfgs": torch.optim.LBFGS}
    if name not in classes:
        raise ValueError(f"method.optimizer={name!r} is invalid; use adam, sgd or lbfgs.")
    try:
        return classes[name](params, lr=lr, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"method.optimizer_kwargs={kwargs!r} is invalid for {classes[name].__name__}: {error}") from error


def make_loader(tensors: dict[str, torch.Tensor], batch_size: int | None, seed: int) -> DataLoader:
    """Build a shuffled loader over the calibration rows; ``batch_size=None`` means one full batch."""
    n = tensors["labels"].shape[0]
    # Without a separate support, the layer entropies are taken over the option logits.
    tensors = {"plm_support": tensors.get("plm_lens"), "polm_support": tensors.get("polm_lens")} | tensors
    dataset = TensorDataset(*(tensors[name] for name in FIELDS))
    size = n if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"method.batch_size={batch_size!r} is invalid; use a positive count or null.")
    # The same shuffled batches as DataLoader(dataset, size, shuffle=True, generator=...), but each batch
    # is gathered by one index operation per tensor instead of one per row and a collate step.
    # The loader draws its worker base seed from the shared generator before each epoch, as the plain one does.
    generator = torch.Generator().manual_seed(seed)
    sampler = BatchSampler(RandomSampler(dataset, generator=generator), size, drop_last=False)
    return DataLoader(dataset, sampler=sampler, batch_size=None, generator=generator)


def _quiet_lightning() -> None:
    # One Trainer per sweep cell: its banner lines and the tiny-dataset warnings would bury the tables.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


def fit_calibrator(method: dict[str, Any], tensors: dict[str, torch.Tensor], seed: int, logger: Any = False, progress: bool = False) -> tuple[FittedCalibrator, list[float]]:
    """Fit the method's calibrator with a Lightning Trainer, or directly for a one-step full-batch fit.

    With ``method.fit_loop=auto`` (the default) and no logger, a fit of one full-batch step (epochs 1,
    batch_size null: the L-BFGS fits) runs without the Trainer. ``fit_loop=trainer`` always uses it.

    Returns (calibrator, losses): the losses are the loss of the initial calibrator on the whole
    calibration set, the loss of every optimiser step, then the loss of the fitted calibrator on the
    whole calibration set.
    """
    _quiet_lightning()
    L.seed_everything(seed, workers=False, verbose=False)
    module = Calibrator(method, n_columns=int(tensors["polm_final"].shape[1]))
    if method.get("mode") == "faithful":
        drift = {k: method.get(k) for k, v in DACA_FAITHFUL.items() if method.get(k) != v}
        if drift:
            log.warning("DACA faithful mode with settings that differ from the official code: %s", drift)
    with torch.no_grad():
        initial_loss, _ = module.loss(tensors)  # full calibration set at the initial calibrator
    fit_loop = method.get("fit_loop", "auto")
    single_step = int(method.get("epochs", 1)) == 1 and method.get("batch_size") is None
    if fit_loop == "auto" and single_step and not logger:
        # One full-batch step (the L-BFGS fits): the Trainer would run the same closure once, and its
        # start-up (about 40 ms on 2 CPU cores) is most of the fit. The module, loss and optimiser are the same.
        return _finish(method, module, tensors, initial_loss, _fit_single_step(module, tensors))
    recorder = _LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=int(method.get("epochs", 1)),
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        log_every_n_steps=int(method.get("log_every_n_steps", 10)),
        callbacks=[recorder],
        num_sanity_val_steps=0,
    )
    # The tensors are tiny (N x K), so one thread avoids thread-pool overhead that dominates each
    # step, measured at 5x when another process keeps the cores busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(module, train_dataloaders=make_loader(tensors, method.get("batch_size"), seed))
    finally:
        torch.set_num_threads(threads)
    return _finish(method, module, tensors, initial_loss, recorder.losses)


def _fit_single_step(module: Calibrator, tensors: dict[str, torch.Tensor]) -> list[float]:
    """Run one optimiser step on the whole calibration set, as the Trainer's automatic optimisation does."""
    optimizer = module.configure_optimizers()
    batch = [tensor for tensor in next(iter(make_loader(tensors, None, seed=0)))]  # the loader's field order and defaults

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss = optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return [float(loss.detach())]


def _finish(method: dict[str, Any], module: Calibrator, tensors: dict[str, torch.Tensor], initial_loss: torch.Tensor,
            step_losses: list[float]) -> tuple[FittedCalibrator, list[float]]:
    """Check the fitted calibrator and return it with [initial loss, step losses..., final loss]."""
    fitted = module.fitted()
    if fitted.kind == "temperature":
        _check_temperature(method, fitted.temperature)
    elif not (torch.isfinite(fitted.weight).all() and torch.isfinite(fitted.bias).all()):
        raise FloatingPointError(f"{method['name']}: the fitted {fitted.kind} scaling has NaN or inf entries; lower method.lr.")
    with torch.no_grad():
        final_loss, _ = module.loss(tensors)  # full calibration set, comparable across optimisers
    if fitted.kind == "temperature" and module.parametrization == "log" and float(module.raw.detach()) >= module.log_max_temperature:
        log.warning(
            "%s: T reached method.max_temperature=%.4g, so the loss still fell as T grew. The PoLM is then close "
            "to uninformative on this data (or few calibration questions agree); treat the ECE with care.",
            method["name"], fitted.temperature,
        )
    return fitted, [float(initial_loss)] + step_losses + [float(final_loss)]


def _check_temperature(method: dict[str, Any], temperature: float) -> None:
    if not math.isfinite(temperature):
        raise FloatingPointError(f"{method['name']}: the fitted temperature is {temperature}; lower method.lr or change the optimizer.")
    if temperature <= 0:
        raise FloatingPointError(
            f"{method['name']}: the fitted temperature is {temperature:.4g} <= 0, which flips or erases the ranking of "
            "the options. parametrization=raw (as in the official DACA code) does not keep T positive; use "
            "parametrization=log (method=daca) or a lower method.lr."
        )


def fit_temperature(method: dict[str, Any], tensors: dict[str, torch.Tensor], seed: int, logger: Any = False, progress: bool = False) -> tuple[float, list[float]]:
    """Fit a temperature (``fit_calibrator`` for ``method.calibrator=temperature``); returns (T, losses)."""
    if method.get("calibrator", "temperature") != "temperature":
        raise ValueError(f"fit_temperature fits a temperature, but method.calibrator={method['calibrator']}; use fit_calibrator.")
    fitted, step_losses = fit_calibrator(method, tensors, seed, logger, progress)
    return fitted.temperature, step_losses


class _LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))
