"""Losses of the calibration methods, as pure functions of cached option logits and a temperature.

Shapes: N questions, L layers, K option columns. Columns past a question's own option count hold
-inf logits in the cache. Every loss first replaces them by ABSENT_LOGIT, a finite value whose
probability is exactly 0 in float32 even after division by a temperature: an -inf divided by T would
put inf * 0 = NaN into the gradient of T.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)
ABSENT_LOGIT = -1e9


def fill_absent(logits: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(logits), torch.full_like(logits, ABSENT_LOGIT), logits)


def masked_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last axis after replacing absent (-inf) options by ABSENT_LOGIT."""
    return torch.log_softmax(fill_absent(logits), dim=-1)


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last axis; absent options have p = 0 and finite log p."""
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, in nats, for finite log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def jensen_shannon(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) over the last axis."""
    log_m = torch.logaddexp(log_p, log_q) - LN2
    return 0.5 * kl_divergence(log_p, log_m) + 0.5 * kl_divergence(log_q, log_m)


def agreement(plm_logits: torch.Tensor, polm_logits: torch.Tensor) -> torch.Tensor:
    """(N,) bool: both models' untempered final predictions are the same option."""
    return plm_logits.argmax(dim=-1) == polm_logits.argmax(dim=-1)


# --- temperature-scaling oracle -------------------------------------------------------------------
def nll_loss(polm_logits: torch.Tensor, labels: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the gold option under the tempered PoLM (labelled oracle)."""
    return torch.nn.functional.cross_entropy(fill_absent(polm_logits) / temperature, labels)


# --- DACA -----------------------------------------------------------------------------------------
def daca_loss_faithful(plm_logits: torch.Tensor, polm_logits: torch.Tensor, temperature: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Compute the loss of the official DACA code, operation for operation.

    Cross-entropy -sum p_g log q_f with both probabilities clamped to [eps, 1 - eps], disagreeing rows
    set to 0, and the mean taken over the whole batch (agreeing and disagreeing rows alike).
    The agreement mask uses the untempered PoLM logits. Unlike the official code (always 4 options),
    columns that are not options of a question are excluded from the sum, because clamping their
    probability 0 up to eps would add a constant per absent column.
    """
    mask = agreement(plm_logits, polm_logits)[:, None]  # (N, 1)
    present = torch.isfinite(polm_logits)  # (N, K)
    probs_tuned = torch.softmax(fill_absent(polm_logits) / temperature, dim=-1).clamp(eps, 1.0 - eps)
    probs_pre = torch.softmax(fill_absent(plm_logits), dim=-1).clamp(eps, 1.0 - eps)
    terms = -probs_pre * torch.log(probs_tuned)
    terms = torch.where(mask & present, terms, torch.zeros_like(terms))
    return terms.sum(dim=1).mean()


def daca_loss(plm_logits: torch.Tensor, polm_logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """KL(p_PLM || p_PoLM/T) averaged over agreeing rows only (the robust default mode).

    On a full batch it equals the faithful loss up to a constant and a positive factor, so both have
    the same minimiser. The mean over agreeing rows keeps the gradient scale independent of the
    agreement rate. Raises when no row agrees, because the loss is then undefined.
    """
    mask = agreement(plm_logits, polm_logits)
    if not mask.any():
        raise EmptyAgreementError(f"no agreeing question among {mask.numel()}; DACA has nothing to fit on.")
    log_p = masked_log_softmax(plm_logits[mask])
    log_q = masked_log_softmax(fill_absent(polm_logits[mask]) / temperature)
    return kl_divergence(log_p, log_q).mean()


class EmptyAgreementError(ValueError):
    """No calibration question on which PLM and PoLM agree."""


# --- naive matching (all rows) --------------------------------------------------------------------
def match_all_loss(plm_logits: torch.Tensor, polm_logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """KL(p_PLM || p_PoLM/T) over every row: the naive variant DACA shows to under-shoot confidence."""
    return kl_divergence(masked_log_softmax(plm_logits), masked_log_softmax(fill_absent(polm_logits) / temperature)).mean()


# --- Dual-Align (reconstruction) ------------------------------------------------------------------
def layer_divergence(plm_lens: torch.Tensor, polm_lens: torch.Tensor) -> torch.Tensor:
    """(N, L) JSD between the two models' per-layer option distributions (untempered)."""
    return jensen_shannon(masked_log_softmax(plm_lens), masked_log_softmax(polm_lens))


def peak_divergence_layer(divergence: torch.Tensor) -> torch.Tensor:
    """(N,) 0-based index l* = argmax over l in 1..L-1 of |d_l - d_{l-1}| (layers 2..L, 1-based)."""
    if divergence.shape[1] < 2:
        raise ValueError("the peak divergence layer needs at least two layers.")
    jumps = (divergence[:, 1:] - divergence[:, :-1]).abs()  # (N, L-1)
    return jumps.argmax(dim=1) + 1


def post_pdl_mask(pdl: torch.Tensor, n_layers: int) -> torch.Tensor:
    """(N, L) bool, True on layers l >= l*."""
    return torch.arange(n_layers)[None, :] >= pdl[:, None]


def layer_entropies(lens_logits: torch.Tensor, temperature: torch.Tensor | float, scope: str) -> torch.Tensor:
    """(N, L) entropy of each layer's option distribution, tempered per ``scope``.

    scope="all_post_pdl" divides every layer by T; scope="final_only" divides only the last layer,
    so the other layers carry no gradient with respect to T.
    """
    if scope == "all_post_pdl":
        scaled = fill_absent(lens_logits) / temperature
    elif scope == "final_only":
        filled = fill_absent(lens_logits)
        scaled = torch.cat([filled[:, :-1], filled[:, -1:] / temperature], dim=1)
    else:
        raise ValueError(f"temperature_scope={scope!r} is invalid; use 'all_post_pdl' or 'final_only'.")
    return entropy(masked_log_softmax(scaled))


def process_term(plm_entropy: torch.Tensor, polm_entropy: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """(N,) inferential-stability mismatch over the post-PDL layers selected by ``mask`` (N, L).

    mean_sq_diff: mean over l >= l* of (H_PLM^l - H_PoLM^l)^2; sum_sq_diff: the sum instead;
    diff_of_means: (mean_l H_PLM^l - mean_l H_PoLM^l)^2.
    """
    weights = mask.to(plm_entropy.dtype)
    counts = weights.sum(dim=1).clamp(min=1)
    if aggregation in ("mean_sq_diff", "sum_sq_diff"):
        total = ((plm_entropy - polm_entropy) ** 2 * weights).sum(dim=1)
        return total / counts if aggregation == "mean_sq_diff" else total
    if aggregation == "diff_of_means":
        return ((plm_entropy * weights).sum(dim=1) / counts - (polm_entropy * weights).sum(dim=1) / counts) ** 2
    raise ValueError(f"ise_aggregation={aggregation!r} is invalid; use mean_sq_diff, sum_sq_diff or diff_of_means.")


def sample_weights(plm_lens: torch.Tensor, polm_lens: torch.Tensor, weighting: str, weight_fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) weights of the confidence and the process term.

    hard: agreement -> (1, 0), disagreement -> (0, 1).
    soft: agreeing rows keep confidence weight 1 - s and process weight s, disagreeing rows get
    (0, 1), where s in [0, 1] is a per-row drift score: "final_jsd" = JSD of the final layer / ln 2,
    "agreement_confidence" = 1 - min(PLM confidence, PoLM confidence). Disagreeing rows never get
    confidence weight because the KL optimum on them drives T to infinity.
    """
    agree = agreement(plm_lens[:, -1], polm_lens[:, -1]).to(plm_lens.dtype)
    if weighting == "hard":
        return agree, 1.0 - agree
    if weighting != "soft":
        raise ValueError(f"weighting={weighting!r} is invalid; use 'hard' or 'soft'.")
    if weight_fn == "final_jsd":
        score = layer_divergence(plm_lens[:, -1:], polm_lens[:, -1:])[:, 0] / LN2
    elif weight_fn == "agreement_confidence":
        conf_plm = torch.softmax(plm_lens[:, -1], dim=-1).max(dim=-1).values
        conf_polm = torch.softmax(polm_lens[:, -1], dim=-1).max(dim=-1).values
        score = 1.0 - torch.minimum(conf_plm, conf_polm)
    else:
        raise ValueError(f"weight_fn={weight_fn!r} is invalid; use 'final_jsd' or 'agreement_confidence'.")
    score = score.clamp(0.0, 1.0).detach()
    return agree * (1.0 - score), agree * score + (1.0 - agree)


def dual_align_loss(
    plm_lens: torch.Tensor,
    polm_lens: torch.Tensor,
    temperature: torch.Tensor,
    *,
    lam: float,
    temperature_scope: str,
    ise_aggregation: str,
    weighting: str,
    weight_fn: str,
    pdl: torch.Tensor | None = None,
    terms: str = "both",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reconstructed Dual-Align objective on (N, L, K) lens logits; returns (loss, parts for logging).

    loss = mean_x [ w_conf(x) KL(p_PLM^L || p_PoLM^L / T) + lam * w_proc(x) ISE-mismatch(x) ].
    ``terms`` selects "both", "confidence" or "process" for the ablations.
    """
    if pdl is None:
        pdl = peak_divergence_layer(layer_divergence(plm_lens, polm_lens))
    w_conf, w_proc = sample_weights(plm_lens, polm_lens, weighting, weight_fn)
    confidence = kl_divergence(masked_log_softmax(plm_lens[:, -1]), masked_log_softmax(fill_absent(polm_lens[:, -1]) / temperature))
    mask = post_pdl_mask(pdl, plm_lens.shape[1])
    h_plm = layer_entropies(plm_lens, 1.0, "all_post_pdl")
    h_polm = layer_entropies(polm_lens, temperature, temperature_scope)
    process = process_term(h_plm, h_polm, mask, ise_aggregation)
    use_conf = terms in ("both", "confidence")
    use_proc = terms in ("both", "process")
    if terms not in ("both", "confidence", "process"):
        raise ValueError(f"terms={terms!r} is invalid; use both, confidence or process.")
    loss = (w_conf * confidence * use_conf + lam * w_proc * process * use_proc).mean()
    return loss, {"confidence_term": (w_conf * confidence).mean().detach(), "process_term": (w_proc * process).mean().detach()}
