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


WEIGHTINGS = ("hard", "soft", "soft_all")
WEIGHT_FUNCTIONS = ("final_jsd", "agreement_confidence", "pdl_jump")


def drift_score(plm_lens: torch.Tensor, polm_lens: torch.Tensor, weight_fn: str) -> torch.Tensor:
    """(N,) per-row process-drift score s in [0, 1], without gradient.

    final_jsd: JSD of the two final option distributions / ln 2;
    agreement_confidence: 1 - min(PLM confidence, PoLM confidence);
    pdl_jump: the height of the largest layer-to-layer JSD change (the PDL's jump) / ln 2.
    """
    if weight_fn == "final_jsd":
        score = layer_divergence(plm_lens[:, -1:], polm_lens[:, -1:])[:, 0] / LN2
    elif weight_fn == "agreement_confidence":
        conf_plm = torch.softmax(fill_absent(plm_lens[:, -1]), dim=-1).max(dim=-1).values
        conf_polm = torch.softmax(fill_absent(polm_lens[:, -1]), dim=-1).max(dim=-1).values
        score = 1.0 - torch.minimum(conf_plm, conf_polm)
    elif weight_fn == "pdl_jump":
        divergence = layer_divergence(plm_lens, polm_lens)
        score = (divergence[:, 1:] - divergence[:, :-1]).abs().amax(dim=1) / LN2
    else:
        raise ValueError(f"weight_fn={weight_fn!r} is invalid; use one of {list(WEIGHT_FUNCTIONS)}.")
    return score.clamp(0.0, 1.0).detach()


def sample_weights(plm_lens: torch.Tensor, polm_lens: torch.Tensor, weighting: str, weight_fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) weights of the confidence and the process term.

    hard: agreement -> (1, 0), disagreement -> (0, 1).
    soft: agreeing rows get confidence weight 1 - s and process weight s, disagreeing rows (0, 1),
    where s = drift_score(weight_fn). Disagreeing rows get no confidence weight because the KL
    optimum on them drives T to infinity (DACA's argument).
    soft_all: every row gets (1 - s, s), disagreeing rows included: the reading in which weighting
    replaces the split entirely.
    """
    agree = agreement(plm_lens[:, -1], polm_lens[:, -1]).to(plm_lens.dtype)
    if weighting == "hard":
        return agree, 1.0 - agree
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} is invalid; use one of {list(WEIGHTINGS)}.")
    score = drift_score(plm_lens, polm_lens, weight_fn)
    if weighting == "soft_all":
        return 1.0 - score, score
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
    plm_support: torch.Tensor | None = None,
    polm_support: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reconstructed Dual-Align objective on (N, L, K) lens logits; returns (loss, parts for logging).

    loss = mean_x [ w_conf(x) KL(p_PLM^L || p_PoLM^L / T) + lam * w_proc(x) ISE-mismatch(x) ].
    ``terms`` selects "both", "confidence" or "process" for the ablations. The layer entropies of
    the process term are taken over ``*_support`` (N, L, B) bin logits (see ``support_logits``);
    by default over the option logits themselves.
    """
    if pdl is None:
        pdl = peak_divergence_layer(layer_divergence(plm_lens, polm_lens))
    plm_support = plm_lens if plm_support is None else plm_support
    polm_support = polm_lens if polm_support is None else polm_support
    w_conf, w_proc = sample_weights(plm_lens, polm_lens, weighting, weight_fn)
    confidence = kl_divergence(masked_log_softmax(plm_lens[:, -1]), masked_log_softmax(fill_absent(polm_lens[:, -1]) / temperature))
    mask = post_pdl_mask(pdl, plm_lens.shape[1])
    h_plm = layer_entropies(plm_support, 1.0, "all_post_pdl")
    h_polm = layer_entropies(polm_support, temperature, temperature_scope)
    process = process_term(h_plm, h_polm, mask, ise_aggregation)
    use_conf = terms in ("both", "confidence")
    use_proc = terms in ("both", "process")
    if terms not in ("both", "confidence", "process"):
        raise ValueError(f"terms={terms!r} is invalid; use both, confidence or process.")
    loss = (w_conf * confidence * use_conf + lam * w_proc * process * use_proc).mean()
    return loss, {"confidence_term": (w_conf * confidence).mean().detach(), "process_term": (w_proc * process).mean().detach()}


# --- supports of the layer distributions ----------------------------------------------------------
# The diagnosis and the process term compare per-layer distributions. "options" uses the K option
# tokens; the other supports partition the vocabulary into bins: "full_vocab" = the K options plus
# one bin for the rest of the vocabulary; "topk" = the options, the layer's top-k tokens, and one
# bin for the rest. A bin's logit is the logsumexp of its tokens' logits, so at T = 1 each bin holds
# its exact probability. NOTE (approximation): dividing the rest bin's logit by T tempers it as if it
# were one token; exact tempering of the full vocabulary needs every logit, which is not cached.
SUPPORTS = ("options", "full_vocab", "topk")


def _rest_bin(bins: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(..., B + 1): ``bins`` plus one logit holding log of the vocabulary mass outside them."""
    listed = torch.logsumexp(fill_absent(bins), dim=-1)  # (...)
    share = (listed - lse).exp().clamp(max=1.0 - 1e-6)
    rest = lse + torch.log1p(-share)
    return torch.cat([bins, rest[..., None]], dim=-1)


def _topk_non_options(lens_logits: torch.Tensor, topk_logits: torch.Tensor, topk_ids: torch.Tensor, option_ids: torch.Tensor) -> torch.Tensor:
    """(N, L, k) top-k logits with -inf where the token is one of the question's own options."""
    present = torch.isfinite(lens_logits[:, :1, :])  # (N, 1, K): option columns of each question
    is_option = ((topk_ids.long()[..., None] == option_ids) & present[:, :, None, :]).any(dim=-1)
    return torch.where(is_option, torch.full_like(topk_logits, float("-inf")), topk_logits)


def support_logits(support: str, lens_logits: torch.Tensor, lse: torch.Tensor | None = None, topk_logits: torch.Tensor | None = None,
                   topk_ids: torch.Tensor | None = None, option_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(N, L, B) bin logits of one model's layer distributions over ``support``."""
    if support == "options":
        return lens_logits
    if lse is None:
        raise ValueError(f"support={support!r} needs the per-layer logsumexp (readout.full_vocab_lse=true).")
    if support == "full_vocab":
        return _rest_bin(lens_logits, lse)
    if support == "topk":
        if topk_logits is None or topk_ids is None or option_ids is None:
            raise ValueError("support='topk' needs per-layer top-k logits; set readout.topk to a positive k (e.g. 16).")
        bins = torch.cat([lens_logits, _topk_non_options(lens_logits, topk_logits, topk_ids, option_ids)], dim=-1)
        return _rest_bin(bins, lse)
    raise ValueError(f"support={support!r} is invalid; use one of {list(SUPPORTS)}.")


def shared_topk_logits(plm: dict[str, torch.Tensor], polm: dict[str, torch.Tensor], option_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, K + k + 1) bin logits of both models on one common partition, for their JSD.

    Each model lists different top-k tokens. A token gets its own bin only when it is in both lists
    (both logits known); every other token falls into the rest bin of both models. The JSD on this
    coarser partition is a lower bound of the JSD on the full vocabulary.
    Each dict holds lens_option_logits, lens_logsumexp, lens_topk_logits and lens_topk_ids.
    """
    plm_ids, polm_ids = plm["lens_topk_ids"].long(), polm["lens_topk_ids"].long()
    match = plm_ids[..., :, None] == polm_ids[..., None, :]  # (N, L, k, k)
    plm_top = _topk_non_options(plm["lens_option_logits"], plm["lens_topk_logits"], plm_ids, option_ids)
    common = match.any(dim=-1) & torch.isfinite(plm_top)
    polm_on_plm_ids = (match.to(polm["lens_topk_logits"].dtype) * polm["lens_topk_logits"][..., None, :]).sum(dim=-1)
    neg_inf = torch.full_like(plm_top, float("-inf"))
    plm_bins = torch.cat([plm["lens_option_logits"], torch.where(common, plm_top, neg_inf)], dim=-1)
    polm_bins = torch.cat([polm["lens_option_logits"], torch.where(common, polm_on_plm_ids, neg_inf)], dim=-1)
    return _rest_bin(plm_bins, plm["lens_logsumexp"]), _rest_bin(polm_bins, polm["lens_logsumexp"])


# --- vector and matrix scaling ---------------------------------------------------------------------
# Vector scaling maps option scores z to z * w + b (2K parameters), matrix scaling to W z + b
# (K^2 + K parameters), both per option position (A, B, C, ...). Unlike a temperature, both can
# change the argmax. NOTE: the scores z are the log-probabilities over the question's own options,
# not the raw option logits (Guo et al. scale logits; the DACA paper does not say which scores it
# scales). Raw option logits carry a per-question offset (the logsumexp of the whole vocabulary),
# which vector and matrix scaling, unlike a temperature, would not cancel.
SCALINGS = ("temperature", "vector", "matrix")


def scaling_parameter_count(kind: str, n_columns: int) -> int:
    """Number of learnable parameters of a ``kind`` calibrator over ``n_columns`` option positions."""
    counts = {"temperature": 1, "vector": 2 * n_columns, "matrix": n_columns * n_columns + n_columns}
    if kind not in counts:
        raise ValueError(f"calibrator={kind!r} is invalid; use one of {list(SCALINGS)}.")
    return counts[kind]


def scale_logits(logits: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(N, K) calibrated logits of vector (weight (K,)) or matrix (weight (K, K)) scaling.

    Absent options (-inf in ``logits``) stay -inf, and they contribute nothing to the matrix product,
    so a 3-option question uses the top-left 3 x 3 block of W and the first 3 entries of b.
    """
    present = torch.isfinite(logits)  # (N, K)
    scores = torch.where(present, masked_log_softmax(logits), torch.zeros_like(logits))  # (N, K) log-probs, 0 where absent
    if kind == "vector":
        scaled = scores * weight + bias
    elif kind == "matrix":
        scaled = scores @ weight.T + bias  # row n: sum_j W[i, j] z[n, j] + b[i]
    else:
        raise ValueError(f"calibrator={kind!r} has no weight and bias; use 'vector' or 'matrix'.")
    return torch.where(present, scaled, torch.full_like(scaled, float("-inf")))


def nll_loss_scaled(scaled_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the gold option under already calibrated logits (labelled oracle)."""
    return torch.nn.functional.cross_entropy(fill_absent(scaled_logits), labels)


def daca_loss_scaled(plm_logits: torch.Tensor, polm_logits: torch.Tensor, scaled_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_PLM || softmax(scaled_logits)) averaged over the rows where PLM and untempered PoLM agree.

    NOTE: the agreement mask comes from the PoLM before calibration and stays fixed while fitting.
    The DACA paper's formula for vector and matrix scaling takes the PoLM prediction after
    rescaling, which would move the mask at every step; with a temperature both readings agree.
    """
    mask = agreement(plm_logits, polm_logits)
    if not mask.any():
        raise EmptyAgreementError(f"no agreeing question among {mask.numel()}; DACA has nothing to fit on.")
    return kl_divergence(masked_log_softmax(plm_logits[mask]), masked_log_softmax(scaled_logits[mask])).mean()


def match_all_loss_scaled(plm_logits: torch.Tensor, scaled_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_PLM || softmax(scaled_logits)) over every row (naive matching with vector/matrix scaling)."""
    return kl_divergence(masked_log_softmax(plm_logits), masked_log_softmax(scaled_logits)).mean()
