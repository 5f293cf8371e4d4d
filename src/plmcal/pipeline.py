"""One calibration job: read out both models (cached), split, fit a temperature, evaluate."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from plmcal import data, lens, losses, metrics, models, predict
from plmcal.cache import ReadoutCache
from plmcal.module import FittedCalibrator, changes_predictions, fit_calibrator
from plmcal.prompt import PromptSpec, build_prompts, split_fewshot
from plmcal.shards import ShardStore

log = logging.getLogger(__name__)


class PipelineError(ValueError):
    """The pair, data or read-outs cannot support the requested method."""


@dataclass
class Readout:
    """The cached read-out of one model on one dataset."""

    spec: models.ModelSpec
    tensors: dict[str, torch.Tensor]
    option_ids: list[int]
    key: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.tensors["lens_option_logits"].shape[1]) if "lens_option_logits" in self.tensors else 0


def library_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("torch", "transformers")}


def daca_split(n: int, test_size: float = 0.7, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Return (calibration, test) indices exactly as ``sklearn.model_selection.train_test_split``.

    Re-implemented (ShuffleSplit's draw: test = ceil(test_size * n), one permutation from
    ``np.random.RandomState(seed)``, test first) so that sklearn stays a test-only dependency; a test
    checks equality with sklearn.
    """
    if not 0.0 < test_size < 1.0:
        raise PipelineError(f"split.test_size={test_size!r} is invalid; use a fraction in (0, 1).")
    n_test = int(np.ceil(test_size * n))
    n_calibration = n - n_test
    if n_calibration < 1 or n_test < 1:
        raise PipelineError(f"{n} questions cannot be split with test_size={test_size}; use more questions.")
    permutation = np.random.RandomState(seed).permutation(n)
    return permutation[n_test : n_test + n_calibration], permutation[:n_test]


SPLIT_BY = (None, "subject")


def split_indices(n: int, split: dict[str, Any], groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (calibration, test) indices: one DACA split, or with ``split.by=subject`` one per subject.

    Per subject, the subject's questions get the same sklearn-identical draw (``test_size``, ``seed``)
    as :func:`daca_split`, and the calibration and test parts of all subjects are concatenated.
    """
    by = split.get("by")
    if by not in SPLIT_BY:
        raise PipelineError(f"split.by={by!r} is invalid; use null (one split) or 'subject' (one split per subject).")
    test_size, seed = float(split.get("test_size", 0.7)), int(split.get("seed", 1))
    if by is None:
        return daca_split(n, test_size, seed)
    if groups is None or len(groups) != n:
        raise PipelineError(f"split.by=subject needs one subject per question, got {None if groups is None else len(groups)} for {n}.")
    positions: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        positions.setdefault(group, []).append(index)
    if len(positions) < 2:
        log.warning("split.by=subject: the dataset has a single subject, so the split equals split.by=null")
    calibration, test = [], []
    for group, members in positions.items():
        members_array = np.asarray(members)
        try:
            group_calibration, group_test = daca_split(len(members), test_size, seed)
        except PipelineError as error:
            raise PipelineError(f"subject {group!r}: {error} Drop the subject or use split.by=null.") from error
        calibration.append(members_array[group_calibration])
        test.append(members_array[group_test])
    return np.concatenate(calibration), np.concatenate(test)


def macro_average(per_group: dict[str, dict[str, float]]) -> dict[str, float]:
    """Average every metric over the groups with equal weight; ``n`` becomes the total count."""
    names = next(iter(per_group.values())).keys()
    averaged = {name: float(np.mean([metrics[name] for metrics in per_group.values()])) for name in names if name != "n"}
    return averaged | {"n": int(sum(metrics["n"] for metrics in per_group.values()))}


def per_group_results(
    groups: list[str], test_index: torch.Tensor, probabilities: dict[str, torch.Tensor], labels: torch.Tensor, n_bins: int
) -> dict[str, Any]:
    """Evaluate each subject's test questions and macro-average over subjects.

    ``probabilities`` maps a result key (``test``, ``test_uncalibrated``, ``plm_test``) to the (N_test, K)
    probabilities of the test questions. Returns ``per_subject`` and the macro averages under the same keys.
    """
    test_groups = [groups[i] for i in test_index.tolist()]
    per_subject: dict[str, dict[str, Any]] = {}
    for group in dict.fromkeys(test_groups):
        rows = torch.tensor([g == group for g in test_groups])
        per_subject[group] = {key: evaluate(probs[rows], labels[rows], n_bins) for key, probs in probabilities.items()}
    macro = {key: macro_average({group: result[key] for group, result in per_subject.items()}) for key in probabilities}
    return {"per_subject": per_subject, **macro}


def check_option_tokens(pair_tokenizers: dict[str, Any], option_strings: list[str]) -> dict[str, list[int]]:
    """Resolve option ids in each tokenizer and reject letters that decode differently across them."""
    resolved = {name: lens.resolve_option_ids(tok, option_strings, name) for name, tok in pair_tokenizers.items()}
    decoded = {name: [tok.decode([i]) for i in resolved[name]] for name, tok in pair_tokenizers.items()}
    reference_name, reference = next(iter(decoded.items()))
    for name, strings in decoded.items():
        if strings != reference:
            raise lens.LensError(
                f"option tokens differ between tokenizers: {reference_name!r} reads {reference}, {name!r} reads "
                f"{strings}. Both models must score the same option strings; change `prompt.option_token`."
            )
    return resolved


def require_equal_depth(method_name: str, plm_name: str, plm_depth: int, polm_name: str, polm_depth: int) -> None:
    """Raise unless both models have the same number of layers (the layer-wise methods need it)."""
    if plm_depth != polm_depth:
        raise PipelineError(
            f"{method_name} needs PLM and PoLM of equal depth, got {plm_name} with {plm_depth} layers and "
            f"{polm_name} with {polm_depth}. Use a same-family pair, or a final-layer method (vanilla, ts_oracle, daca)."
        )


def check_finite(readout: Readout, dataset: str, rows: list[data.MCQuestion]) -> None:
    """Raise when any read-out value is NaN or +-inf outside the absent-option columns."""
    n_options = readout.tensors["n_options"]
    for name in ("final_option_logits", "lens_option_logits"):
        if name not in readout.tensors:
            continue
        values = readout.tensors[name]
        k = values.shape[-1]
        present = torch.arange(k)[None, :] < n_options[:, None]  # (N, K)
        if values.ndim == 3:
            present = present[:, None, :].expand_as(values)
        bad = ~torch.isfinite(values) & present
        if bad.any():
            rows_bad = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
            ids = [rows[i].id for i in rows_bad[:5]]
            raise PipelineError(
                f"{readout.spec.name} on {dataset}: {len(rows_bad)} questions have NaN/inf in {name} (first ids: {ids}). "
                f"The cached read-out is kept for inspection; a float16/bfloat16 overflow is the usual cause, so try "
                f"`pair.{{plm,polm}}.dtype=float32`."
            )


def read_out(
    spec: models.ModelSpec,
    rows: list[data.MCQuestion],
    exemplars: list[data.MCQuestion],
    prompt: PromptSpec,
    option_ids: list[int],
    settings: lens.ReadoutSettings,
    cache: ReadoutCache,
    dataset_key: dict,
    cache_dir: str | None,
    device: str,
) -> Readout | None:
    """Return the model's read-out on ``rows``, from the cache or from one forward pass per question.

    Finished shards of an interrupted read-out are reused. Returns None on the non-zero ranks of a
    multi-process read-out (``readout.engine=lightning`` with strategy ddp), where rank 0 saves the entry.
    """
    key = {
        "model": spec.name,
        "weights": spec.identity(cache_dir),
        "dtype": spec.dtype,
        "dataset": dataset_key["name"],
        "data": dataset_key,
        "prompt": {"name": prompt.name, "version": prompt.version, "digest": prompt.digest()},
        "exemplars": [row.id for row in exemplars],
        "readout": settings.key(),
        "libraries": library_versions(),
    }
    # Ranks of a multi-process read-out must all reach the predict loop, so they cannot queue on the lock.
    multi_rank = settings.engine == "lightning" and int(settings.devices) > 1
    with contextlib.nullcontext() if multi_rank else cache.lock(key):
        tensors = cache.load(key)
        if tensors is None:
            tensors = _compute(spec, rows, exemplars, prompt, option_ids, settings, cache, key, dataset_key, cache_dir, device)
    if tensors is None:
        return None  # a non-zero rank of a multi-process read-out: rank 0 merges and saves
    return Readout(spec, tensors, option_ids, key)


def _compute(
    spec: models.ModelSpec,
    rows: list[data.MCQuestion],
    exemplars: list[data.MCQuestion],
    prompt: PromptSpec,
    option_ids: list[int],
    settings: lens.ReadoutSettings,
    cache: ReadoutCache,
    key: dict,
    dataset_key: dict,
    cache_dir: str | None,
    device: str,
) -> dict[str, torch.Tensor] | None:
    """Load the model, read it out (resuming from finished shards) and save the cache entry."""
    shards = ShardStore(cache.shard_dir(key), key)
    model, tokenizer = models.load(spec, cache_dir, device)
    try:
        prompts = build_prompts(tokenizer, rows, prompt, exemplars)
        extract = lens.extract if settings.engine == "loop" else predict.extract
        started = time.perf_counter()
        tensors = extract(
            model,
            tokenizer,
            prompts,
            option_ids,
            [len(row.options) for row in rows],
            settings,
            add_special_tokens=not prompt.chat_template,  # a chat template already inserts BOS
            description=f"{spec.name} on {dataset_key['name']}",
            shards=shards,
        )
        seconds = time.perf_counter() - started
        if tensors is None:
            return None  # a non-zero rank: its shards are written, rank 0 merges them
        log.info("%s: %d questions read out in %.1f s (%.2f questions/s)", spec.name, len(rows), seconds, len(rows) / seconds)
        cache.save(key, tensors, extra={"seconds": seconds, "model": models.describe(model), "option_ids": option_ids})
        shards.remove()
    finally:
        models.release(model)
    return tensors


def option_mass(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) probability mass that the full next-token distribution puts on the option tokens."""
    option_lse = torch.logsumexp(losses.fill_absent(tensors["final_option_logits"]), dim=-1)
    return (option_lse - tensors["final_logsumexp"]).exp()


def tempered_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, K) float64 probabilities: float32 would tie the options of a question at very large T."""
    return torch.softmax(losses.fill_absent(logits).double() / temperature, dim=-1)


def apply_calibrator(calibrator: FittedCalibrator, logits: torch.Tensor) -> torch.Tensor:
    """(N, K) float64 probabilities of the calibrated PoLM from its (N, K) option logits."""
    if calibrator.kind == "temperature":
        return tempered_probs(logits, calibrator.temperature)
    scaled = losses.scale_logits(logits.double(), calibrator.kind, calibrator.weight.double(), calibrator.bias.double())
    return torch.softmax(losses.fill_absent(scaled), dim=-1)


def _lens_tensors(readout: Readout, support: str) -> dict[str, torch.Tensor]:
    needed = {"options": ("lens_option_logits",), "full_vocab": ("lens_option_logits", "lens_logsumexp"),
              "topk": ("lens_option_logits", "lens_logsumexp", "lens_topk_logits", "lens_topk_ids")}[support]
    missing = [name for name in needed if name not in readout.tensors]
    if missing:
        fix = "readout.topk=16" if "lens_topk_ids" in missing else "readout.full_vocab_lse=true"
        raise PipelineError(f"method.support={support} needs {missing} in the read-out of {readout.spec.name}; set {fix}.")
    return {name: readout.tensors[name] for name in needed}


def check_support(support: str) -> None:
    if support not in losses.SUPPORTS:
        raise PipelineError(f"method.support={support!r} is invalid; use one of {list(losses.SUPPORTS)}.")


def layer_divergence_for(plm: Readout, polm: Readout, support: str) -> torch.Tensor:
    """(N, L) JSD between the two models' layer distributions over ``support``."""
    check_support(support)
    a, b = _lens_tensors(plm, support), _lens_tensors(polm, support)
    if support == "options":
        return losses.layer_divergence(a["lens_option_logits"], b["lens_option_logits"])
    if support == "full_vocab":
        log_a = losses.masked_log_softmax(losses.support_logits("full_vocab", a["lens_option_logits"], a["lens_logsumexp"]))
        log_b = losses.masked_log_softmax(losses.support_logits("full_vocab", b["lens_option_logits"], b["lens_logsumexp"]))
        return losses.jensen_shannon(log_a, log_b)
    if plm.option_ids != polm.option_ids:
        raise PipelineError("method.support=topk compares token ids, so both models need the same tokenizer; use support=options.")
    bins_a, bins_b = losses.shared_topk_logits(a, b, torch.tensor(plm.option_ids))
    return losses.jensen_shannon(losses.masked_log_softmax(bins_a), losses.masked_log_softmax(bins_b))


def pdl_for(plm: Readout, polm: Readout, support: str) -> torch.Tensor:
    """Peak divergence layer per question, from the JSD over ``support``."""
    return losses.peak_divergence_layer(layer_divergence_for(plm, polm, support))


def support_for(readout: Readout, support: str) -> torch.Tensor:
    """(N, L, B) bin logits of one model's layer distributions over ``support`` (for the entropies)."""
    check_support(support)
    t = _lens_tensors(readout, support)
    return losses.support_logits(support, t["lens_option_logits"], t.get("lens_logsumexp"), t.get("lens_topk_logits"),
                                 t.get("lens_topk_ids"), torch.tensor(readout.option_ids))


def evaluate(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> dict[str, float]:
    return metrics.summarize(probs, labels, n_bins)


def run_calibration(
    method: dict[str, Any], plm: Readout, polm: Readout, labels: torch.Tensor, split: dict[str, Any], seed: int, n_bins: int = 10, logger: Any = False,
    groups: list[str] | None = None,
    ensemble_probs: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Split, fit the method's calibrator on the calibration part, evaluate on the test part.

    With ``split.by=subject`` (``groups`` = each question's subject) every subject is split on its own,
    one calibrator is fitted on all calibration parts, and ``test``, ``test_uncalibrated`` and
    ``plm_test`` are macro averages over subjects (pooled values under ``*_pooled``, each subject's
    under ``per_subject``).
    ``ensemble_probs`` (N, K), when given, are the PoLM probabilities of a method that fits nothing
    but reads the PoLM out several times (CAPE); they replace the calibrated probabilities.
    Only methods for which ``module.changes_predictions`` holds may change the PoLM's answers.
    """
    if method.get("ensemble") is not None and ensemble_probs is None:
        raise PipelineError(
            f"{method['name']}: method.ensemble={method['ensemble']} needs the ensembled PoLM probabilities "
            "(plmcal.cape.ensemble_readouts); run it through plmcal.run."
        )
    n = labels.shape[0]
    calibration_index, test_index = split_indices(n, split, groups)
    calibration_index, test_index = torch.as_tensor(calibration_index), torch.as_tensor(test_index)
    plm_final, polm_final = plm.tensors["final_option_logits"], polm.tensors["final_option_logits"]
    agree = losses.agreement(plm_final, polm_final)
    name = method["name"]

    tensors: dict[str, torch.Tensor] = {
        "plm_final": plm_final[calibration_index],
        "polm_final": polm_final[calibration_index],
        "labels": labels[calibration_index],
    }
    needs_lens = method.get("loss") == "dual_align"
    if needs_lens:
        if plm.n_layers == 0 or polm.n_layers == 0:
            raise PipelineError(f"{name} needs per-layer read-outs; set readout.lens=true.")
        require_equal_depth(name, plm.spec.name, plm.n_layers, polm.spec.name, polm.n_layers)
        support = method.get("support", "options")
        pdl = pdl_for(plm, polm, support)
        tensors |= {
            "plm_lens": plm.tensors["lens_option_logits"][calibration_index],
            "polm_lens": polm.tensors["lens_option_logits"][calibration_index],
            "pdl": pdl[calibration_index],
            "plm_support": support_for(plm, support)[calibration_index],
            "polm_support": support_for(polm, support)[calibration_index],
        }
    else:
        empty = torch.zeros(len(calibration_index), 1, 1)
        tensors |= {"plm_lens": empty, "polm_lens": empty, "pdl": torch.zeros(len(calibration_index), dtype=torch.long),
                    "plm_support": empty, "polm_support": empty}

    n_agree = int(agree[calibration_index].sum())
    uses_agreement = method.get("loss") == "daca" or (needs_lens and method.get("terms", "both") != "process")
    if uses_agreement and n_agree == 0:
        raise losses.EmptyAgreementError(
            f"{name}: PLM and PoLM agree on none of the {len(calibration_index)} calibration questions, so the "
            "confidence-alignment term has no sample. Use more questions, another pair, or method=ts_oracle."
        )

    fit_info: dict[str, Any] = {"steps": 0, "seconds": 0.0}
    calibrator = FittedCalibrator("temperature", temperature=1.0)
    if method.get("fit", True):
        started = time.perf_counter()
        calibrator, step_losses = fit_calibrator(method, tensors, seed=seed, logger=logger)
        fit_info = {
            "steps": len(step_losses) - 2,
            "seconds": time.perf_counter() - started,
            "loss_initial": step_losses[0],
            "loss_final": step_losses[-1],
            "hit_max_temperature": calibrator.kind == "temperature"
            and bool(calibrator.temperature >= float(method.get("max_temperature") or 1e4) * (1 - 1e-4)),
        }
    temperature = calibrator.temperature if ensemble_probs is None else None  # None: no temperature (vector, matrix, CAPE)

    test_labels = labels[test_index]
    before = tempered_probs(polm_final[test_index], 1.0)
    if ensemble_probs is not None:
        if ensemble_probs.shape != polm_final.shape:
            raise PipelineError(f"{name}: ensemble probabilities of shape {tuple(ensemble_probs.shape)} do not match the read-out {tuple(polm_final.shape)}.")
        after = ensemble_probs[test_index].double()
    else:
        after = apply_calibrator(calibrator, polm_final[test_index])
    plm_probs = tempered_probs(plm_final[test_index], 1.0)
    result = {
        "method": name,
        "temperature": temperature,
        "calibrator": calibrator.summary() if ensemble_probs is None else {"kind": method.get("ensemble"), "n_params": 0},
        "n_calibration": len(calibration_index),
        "n_test": len(test_index),
        "test": evaluate(after, test_labels, n_bins),
        "test_uncalibrated": evaluate(before, test_labels, n_bins),
        "plm_test": evaluate(plm_probs, test_labels, n_bins),
        "diagnostics": {
            "agreement_rate": float(agree[test_index].float().mean()),
            "agreement_rate_calibration": n_agree / len(calibration_index),
            "option_mass_plm": float(option_mass(plm.tensors)[test_index].mean()),
            "option_mass_polm": float(option_mass(polm.tensors)[test_index].mean()),
            "greedy_is_option_plm": float(plm.tensors["greedy_is_option"][test_index].float().mean()),
            "greedy_is_option_polm": float(polm.tensors["greedy_is_option"][test_index].float().mean()),
        },
        "fit": fit_info,
        "reliability": {
            "before": metrics.reliability_bins(before.max(dim=-1).values, (before.argmax(-1) == test_labels).double(), n_bins),
            "after": metrics.reliability_bins(after.max(dim=-1).values, (after.argmax(-1) == test_labels).double(), n_bins),
        },
    }
    # Per-question test predictions of the calibrated PoLM, written to predictions.npz rather than
    # results.json: the aggregation bootstraps its intervals from them. float32 confidences keep run
    # folders small (the uncalibrated PoLM is the vanilla job's, and the point metrics above are float64).
    result["arrays"] = {
        "test_index": test_index.numpy().astype(np.int32),
        "labels": test_labels.numpy().astype(np.int16),
        "confidence": after.max(dim=-1).values.numpy().astype(np.float32),
        "prediction": after.argmax(dim=-1).numpy().astype(np.int16),
    }
    changed = before.argmax(-1) != after.argmax(-1)
    result["diagnostics"]["prediction_changed_rate"] = float(changed.double().mean())
    if changed.any() and not changes_predictions(method):
        raise PipelineError(f"{name}: temperature {temperature} changed a prediction; this is a bug, please report it.")
    if split.get("by") == "subject":
        # NOTE: DACA averages ECE over MMLU subjects, but its public code does not show whether T is
        # fitted per subject. Here one T is fitted on the calibration parts of all subjects.
        for key in ("test", "test_uncalibrated", "plm_test"):
            result[f"{key}_pooled"] = result[key]
        result |= per_group_results(groups, test_index, {"test": after, "test_uncalibrated": before, "plm_test": plm_probs}, test_labels, n_bins)
    return result


def prepare_questions(dataset_cfg: Any, prompt: PromptSpec, cache_dir: str | None) -> tuple[list[data.MCQuestion], list[data.MCQuestion], dict]:
    rows = data.load_questions(dataset_cfg, cache_dir)
    exemplars, rows = split_fewshot(rows, prompt)
    dataset_key = {
        "name": dataset_cfg.name,
        "version": int(dataset_cfg.get("version", 1)),
        "source": dataset_cfg.get("source", "offline"),
        "fingerprint": data.fingerprint(rows),
        "n": len(rows),
    }
    return rows, exemplars, dataset_key
