"""losses.py: DACA against an independent re-implementation of the official loss, gradients with
absent options, and the Dual-Align switches (temperature scope, weighting, terms, PDL, JSD)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from helpers import official_daca_loss, pair_logits, with_absent
from plmcal import losses, pipeline

DUAL_DEFAULTS = dict(lam=1.0, temperature_scope="all_post_pdl", ise_aggregation="mean_sq_diff", weighting="hard", weight_fn="final_jsd")


def lens_pair(seed: int, n: int = 16, layers: int = 5, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    plm = torch.randn(n, layers, k, generator=generator) * 2
    polm = plm * 2.5 + torch.randn(n, layers, k, generator=generator)
    return plm, polm


# --- DACA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.5, 1.0, 1.7, 4.0])
def test_faithful_loss(t):
    plm, polm = pair_logits(0)
    temperature = torch.tensor(t)
    assert_close(losses.daca_loss_faithful(plm, polm, temperature), official_daca_loss(plm, polm, temperature), rtol=1e-6, atol=1e-7)


def test_faithful_grad():
    plm, polm = pair_logits(1)
    ours = torch.tensor(1.3, requires_grad=True)
    theirs = torch.tensor(1.3, requires_grad=True)
    (grad_ours,) = torch.autograd.grad(losses.daca_loss_faithful(plm, polm, ours), ours)
    (grad_theirs,) = torch.autograd.grad(official_daca_loss(plm, polm, theirs), theirs)
    assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-7)


def test_faithful_has_disagreement():
    # The data must contain disagreeing rows, or the mask would be untested.
    plm, polm = pair_logits(0)
    assert not bool(losses.agreement(plm, polm).all())


def test_faithful_negative_t():
    # The raw T of faithful mode can turn negative, which flips the tempered argmax. The agreement
    # mask must still come from the untempered logits, as in the official code.
    plm, polm = pair_logits(2)
    temperature = torch.tensor(-1.0)
    assert_close(losses.daca_loss_faithful(plm, polm, temperature), official_daca_loss(plm, polm, temperature), rtol=1e-6, atol=1e-7)


def test_robust_vs_kl():
    # Robust loss = mean KL(p_PLM || p_PoLM/T) over agreeing rows.
    plm, polm = pair_logits(2)
    temperature = torch.tensor(2.0)
    agree = plm.argmax(1) == polm.argmax(1)
    expected = F.kl_div(torch.log_softmax(polm[agree] / temperature, 1), torch.log_softmax(plm[agree], 1), log_target=True, reduction="batchmean")
    assert_close(losses.daca_loss(plm, polm, temperature), expected, rtol=1e-5, atol=1e-7)


def test_robust_same_minimiser():
    # On a full batch the robust and faithful losses differ by a constant and a positive factor.
    plm, polm = pair_logits(3)
    grid = torch.linspace(0.5, 6.0, 221)
    robust = torch.stack([losses.daca_loss(plm, polm, t) for t in grid])
    faithful = torch.stack([losses.daca_loss_faithful(plm, polm, t) for t in grid])
    assert int(robust.argmin()) == int(faithful.argmin())


def test_empty_agreement():
    plm = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    polm = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    with pytest.raises(losses.EmptyAgreementError, match="among 2"):
        losses.daca_loss(plm, polm, torch.tensor(1.0))


def test_match_all_vs_kl():
    plm, polm = pair_logits(4)
    temperature = torch.tensor(1.5)
    expected = F.kl_div(torch.log_softmax(polm / temperature, 1), torch.log_softmax(plm, 1), log_target=True, reduction="batchmean")
    assert_close(losses.match_all_loss(plm, polm, temperature), expected, rtol=1e-5, atol=1e-7)


def test_nll_vs_cross_entropy():
    plm, polm = pair_logits(5)
    labels = plm.argmax(1)
    temperature = torch.tensor(2.5)
    assert_close(losses.nll_loss(polm, labels, temperature), F.cross_entropy(polm / temperature, labels), rtol=1e-6, atol=1e-7)


# --- argmax and gradients -------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.05, 0.3, 1.0, 2.0, 7.5, 50.0])
def test_argmax_invariant(t):
    _, polm = pair_logits(6, n=200, k=5)
    polm = with_absent(polm, [2 + i % 4 for i in range(200)])
    before = pipeline.tempered_probs(polm, 1.0).argmax(-1)
    after = pipeline.tempered_probs(polm, t).argmax(-1)
    assert torch.equal(before, after)


def test_absent_prob_zero():
    polm = with_absent(torch.randn(4, 5), [2, 3, 4, 5])
    probs = pipeline.tempered_probs(polm, 0.25)
    assert float(probs[0, 2:].abs().max()) == 0.0


FINAL_LOSSES = {
    "daca": lambda plm, polm, labels, t: losses.daca_loss(plm, polm, t),
    "daca_faithful": lambda plm, polm, labels, t: losses.daca_loss_faithful(plm, polm, t),
    "match_all": lambda plm, polm, labels, t: losses.match_all_loss(plm, polm, t),
    "nll": lambda plm, polm, labels, t: losses.nll_loss(polm, labels, t),
}


@pytest.mark.parametrize("name", sorted(FINAL_LOSSES))
def test_grad_finite_absent(name):
    plm, polm = pair_logits(7, n=12, k=5)
    counts = [2, 3, 4, 5] * 3
    plm, polm = with_absent(plm, counts), with_absent(polm, counts)
    labels = torch.zeros(12, dtype=torch.long)
    temperature = torch.tensor(1.4, requires_grad=True)
    (grad,) = torch.autograd.grad(FINAL_LOSSES[name](plm, polm, labels, temperature), temperature)
    assert bool(torch.isfinite(grad))


@pytest.mark.parametrize("scope", ["all_post_pdl", "final_only"])
def test_dual_grad_finite_absent(scope):
    plm, polm = lens_pair(8, n=8)
    counts = [2, 3, 4, 4] * 2
    absent = torch.arange(4)[None, :] >= torch.tensor(counts)[:, None]
    plm[absent[:, None, :].expand_as(plm)] = float("-inf")
    polm[absent[:, None, :].expand_as(polm)] = float("-inf")
    temperature = torch.tensor(1.2, requires_grad=True)
    loss, _ = losses.dual_align_loss(plm, polm, temperature, **{**DUAL_DEFAULTS, "temperature_scope": scope})
    (grad,) = torch.autograd.grad(loss, temperature)
    assert bool(torch.isfinite(grad))


def test_faithful_absent_columns_excluded():
    # A 2-option row padded to 4 columns has the same faithful loss as the bare 2-option row.
    plm = torch.tensor([[1.0, 0.2, 0.0, 0.0]])
    polm = torch.tensor([[2.0, 0.1, 0.0, 0.0]])
    padded = losses.daca_loss_faithful(with_absent(plm, [2]), with_absent(polm, [2]), torch.tensor(1.5))
    bare = official_daca_loss(plm[:, :2], polm[:, :2], torch.tensor(1.5))
    assert_close(padded, bare, rtol=1e-6, atol=1e-7)


# --- Dual-Align switches --------------------------------------------------------------------------
def test_final_only_lower_layers_constant():
    _, polm = lens_pair(9)
    low = losses.layer_entropies(polm, torch.tensor(0.5), "final_only")
    high = losses.layer_entropies(polm, torch.tensor(3.0), "final_only")
    assert_close(low[:, :-1], high[:, :-1], rtol=0, atol=0)


def test_final_only_last_layer_varies():
    _, polm = lens_pair(9)
    low = losses.layer_entropies(polm, torch.tensor(0.5), "final_only")
    high = losses.layer_entropies(polm, torch.tensor(3.0), "final_only")
    assert bool((low[:, -1] != high[:, -1]).all())


def test_final_only_grad_lower_zero():
    _, polm = lens_pair(10)
    temperature = torch.tensor(1.5, requires_grad=True)
    entropies = losses.layer_entropies(polm, temperature, "final_only")
    (grad,) = torch.autograd.grad(entropies[:, :-1].sum(), temperature)
    assert float(grad) == 0.0


def test_all_post_pdl_lower_varies():
    # Contrast: with all_post_pdl every layer depends on T.
    _, polm = lens_pair(10)
    low = losses.layer_entropies(polm, torch.tensor(0.5), "all_post_pdl")
    high = losses.layer_entropies(polm, torch.tensor(3.0), "all_post_pdl")
    assert bool((low[:, :-1] != high[:, :-1]).all())


def test_final_only_process_grad():
    # With final_only, the process term's gradient equals that of a loss with only the last layer tempered
    # and every other PoLM layer frozen at its untempered entropy.
    plm, polm = lens_pair(11)
    settings = {**DUAL_DEFAULTS, "temperature_scope": "final_only", "terms": "process"}
    pdl = torch.full((plm.shape[0],), 2)
    t = torch.tensor(1.7, requires_grad=True)
    loss, _ = losses.dual_align_loss(plm, polm, t, pdl=pdl, **settings)
    (grad,) = torch.autograd.grad(loss, t)
    t_ref = torch.tensor(1.7, requires_grad=True)
    h_plm = losses.entropy(torch.log_softmax(plm, -1))
    h_polm = torch.cat([losses.entropy(torch.log_softmax(polm[:, :-1], -1)), losses.entropy(torch.log_softmax(polm[:, -1:] / t_ref, -1))], dim=1)
    _, w_proc = losses.sample_weights(plm, polm, "hard", "final_jsd")
    reference = (w_proc * ((h_plm[:, 2:] - h_polm[:, 2:]) ** 2).mean(dim=1)).mean()
    (grad_ref,) = torch.autograd.grad(reference, t_ref)
    assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)


def test_unknown_scope():
    _, polm = lens_pair(12)
    with pytest.raises(ValueError, match="'everywhere'"):
        losses.layer_entropies(polm, torch.tensor(1.0), "everywhere")


def test_hard_weights_confidence():
    plm, polm = lens_pair(13, n=40)
    agree = (plm[:, -1].argmax(-1) == polm[:, -1].argmax(-1)).float()
    w_conf, _ = losses.sample_weights(plm, polm, "hard", "final_jsd")
    assert torch.equal(w_conf, agree)


def test_hard_weights_process():
    plm, polm = lens_pair(13, n=40)
    agree = (plm[:, -1].argmax(-1) == polm[:, -1].argmax(-1)).float()
    _, w_proc = losses.sample_weights(plm, polm, "hard", "final_jsd")
    assert torch.equal(w_proc, 1.0 - agree)


def test_hard_has_both_kinds():
    plm, polm = lens_pair(13, n=40)
    agree = plm[:, -1].argmax(-1) == polm[:, -1].argmax(-1)
    assert 0 < int(agree.sum()) < agree.numel()


def test_hard_confidence_term():
    # terms=confidence with hard weights: mean over all rows of the KL, disagreeing rows counted as 0.
    plm, polm = lens_pair(14, n=40)
    t = torch.tensor(2.0)
    agree = plm[:, -1].argmax(-1) == polm[:, -1].argmax(-1)
    kl = F.kl_div(torch.log_softmax(polm[:, -1] / t, -1), torch.log_softmax(plm[:, -1], -1), log_target=True, reduction="none").sum(-1)
    expected = (kl * agree).sum() / agree.numel()
    loss, _ = losses.dual_align_loss(plm, polm, t, terms="confidence", **DUAL_DEFAULTS)
    assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_soft_disagree_no_confidence():
    plm, polm = lens_pair(15, n=40)
    agree = plm[:, -1].argmax(-1) == polm[:, -1].argmax(-1)
    w_conf, _ = losses.sample_weights(plm, polm, "soft", "agreement_confidence")
    assert float(w_conf[~agree].abs().max()) == 0.0


def test_soft_weights_sum_one():
    plm, polm = lens_pair(15, n=40)
    w_conf, w_proc = losses.sample_weights(plm, polm, "soft", "final_jsd")
    assert_close(w_conf + w_proc, torch.ones(40), rtol=0, atol=1e-6)


def test_process_ignores_confidence():
    plm, polm = lens_pair(16)
    t = torch.tensor(1.8)
    lam = 0.7
    loss, parts = losses.dual_align_loss(plm, polm, t, terms="process", **{**DUAL_DEFAULTS, "lam": lam})
    assert_close(loss, lam * parts["process_term"], rtol=1e-6, atol=1e-7)


def test_process_grad_ignores_confidence():
    # terms=process: the gradient w.r.t. T is that of the weighted process term alone.
    plm, polm = lens_pair(17)
    pdl = torch.full((plm.shape[0],), 1)
    t1 = torch.tensor(1.3, requires_grad=True)
    loss, _ = losses.dual_align_loss(plm, polm, t1, pdl=pdl, terms="process", **DUAL_DEFAULTS)
    (grad,) = torch.autograd.grad(loss, t1)
    t2 = torch.tensor(1.3, requires_grad=True)
    h_plm = losses.layer_entropies(plm, 1.0, "all_post_pdl")
    h_polm = losses.layer_entropies(polm, t2, "all_post_pdl")
    _, w_proc = losses.sample_weights(plm, polm, "hard", "final_jsd")
    mask = losses.post_pdl_mask(pdl, plm.shape[1])
    reference = (w_proc * losses.process_term(h_plm, h_polm, mask, "mean_sq_diff")).mean()
    (grad_ref,) = torch.autograd.grad(reference, t2)
    assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)


def test_both_is_sum():
    plm, polm = lens_pair(18)
    t = torch.tensor(1.1)
    loss, parts = losses.dual_align_loss(plm, polm, t, terms="both", **{**DUAL_DEFAULTS, "lam": 0.5})
    assert_close(loss, parts["confidence_term"] + 0.5 * parts["process_term"], rtol=1e-6, atol=1e-7)


def test_unknown_terms():
    plm, polm = lens_pair(19)
    with pytest.raises(ValueError, match="'output'"):
        losses.dual_align_loss(plm, polm, torch.tensor(1.0), terms="output", **DUAL_DEFAULTS)


@pytest.mark.parametrize("aggregation", ["mean_sq_diff", "sum_sq_diff", "diff_of_means"])
def test_process_aggregation(aggregation):
    h_plm = torch.tensor([[1.0, 2.0, 3.0]])
    h_polm = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.tensor([[False, True, True]])
    expected = {"mean_sq_diff": (1 + 4) / 2, "sum_sq_diff": 1.0 + 4.0, "diff_of_means": (2.5 - 1.0) ** 2}[aggregation]
    assert_close(losses.process_term(h_plm, h_polm, mask, aggregation), torch.tensor([expected]), rtol=0, atol=1e-6)


def test_peak_divergence_layer():
    divergence = torch.tensor(
        [
            [0.0, 0.1, 0.5, 0.6],  # jumps 0.1, 0.4, 0.1 -> layer index 2
            [0.3, 0.2, 0.2, 0.9],  # jumps 0.1, 0.0, 0.7 -> 3
            [0.5, 0.1, 0.1, 0.1],  # a drop counts: jumps 0.4, 0.0, 0.0 -> 1
        ]
    )
    assert losses.peak_divergence_layer(divergence).tolist() == [2, 3, 1]


def test_peak_needs_two_layers():
    with pytest.raises(ValueError, match="two layers"):
        losses.peak_divergence_layer(torch.zeros(3, 1))


def test_post_pdl_mask():
    mask = losses.post_pdl_mask(torch.tensor([1, 3]), 4)
    assert mask.tolist() == [[False, True, True, True], [False, False, False, True]]


def random_log_probs(seed: int, n: int = 200, k: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, k, generator=generator) * 3, dim=-1)


def test_jsd_symmetric():
    p, q = random_log_probs(0), random_log_probs(1)
    assert_close(losses.jensen_shannon(p, q), losses.jensen_shannon(q, p), rtol=1e-6, atol=1e-7)


def test_jsd_nonnegative():
    values = losses.jensen_shannon(random_log_probs(2), random_log_probs(3))
    assert float(values.min()) >= -1e-7


def test_jsd_at_most_ln2():
    values = losses.jensen_shannon(random_log_probs(2), random_log_probs(3))
    assert float(values.max()) <= math.log(2) + 1e-6


def test_jsd_disjoint_is_ln2():
    p = losses.masked_log_softmax(torch.tensor([[0.0, float("-inf")]]))
    q = losses.masked_log_softmax(torch.tensor([[float("-inf"), 0.0]]))
    assert_close(losses.jensen_shannon(p, q), torch.tensor([math.log(2)]), rtol=0, atol=1e-6)


def test_jsd_self_zero():
    p = random_log_probs(4)
    assert_close(losses.jensen_shannon(p, p), torch.zeros(200), rtol=0, atol=1e-6)


# --- new switches: soft_all, pdl_jump, lam, supports -------------------------------------------------
def test_soft_all_disagree_confidence():
    # soft_all gives disagreeing rows confidence weight 1 - s, unlike soft.
    plm, polm = lens_pair(20, n=40)
    agree = plm[:, -1].argmax(-1) == polm[:, -1].argmax(-1)
    w_conf, _ = losses.sample_weights(plm, polm, "soft_all", "final_jsd")
    assert float(w_conf[~agree].min()) > 0.0


def test_soft_all_sum_one():
    plm, polm = lens_pair(20, n=40)
    w_conf, w_proc = losses.sample_weights(plm, polm, "soft_all", "agreement_confidence")
    assert_close(w_conf + w_proc, torch.ones(40), rtol=0, atol=1e-6)


def test_pdl_jump_score():
    plm, polm = lens_pair(21, n=8)
    divergence = losses.layer_divergence(plm, polm)
    expected = (divergence[:, 1:] - divergence[:, :-1]).abs().max(dim=1).values / math.log(2)
    assert_close(losses.drift_score(plm, polm, "pdl_jump"), expected.clamp(0, 1), rtol=1e-6, atol=1e-7)


def test_unknown_weight_fn():
    plm, polm = lens_pair(21, n=8)
    with pytest.raises(ValueError, match="'entropy'"):
        losses.sample_weights(plm, polm, "soft", "entropy")


def test_lam_zero_is_confidence():
    plm, polm = lens_pair(22)
    t = torch.tensor(1.6)
    zero, _ = losses.dual_align_loss(plm, polm, t, **{**DUAL_DEFAULTS, "lam": 0.0})
    confidence, _ = losses.dual_align_loss(plm, polm, t, terms="confidence", **DUAL_DEFAULTS)
    assert_close(zero, confidence, rtol=0, atol=0)


def test_support_entropies_used():
    # The process term takes its entropies from the support logits when they are given.
    plm, polm = lens_pair(23)
    t = torch.tensor(1.4)
    rest = torch.full(plm.shape[:2] + (1,), 3.0)
    plm_support, polm_support = torch.cat([plm, rest], -1), torch.cat([polm, rest], -1)
    with_support, parts = losses.dual_align_loss(plm, polm, t, terms="process", plm_support=plm_support, polm_support=polm_support, **DUAL_DEFAULTS)
    options_only, _ = losses.dual_align_loss(plm, polm, t, terms="process", **DUAL_DEFAULTS)
    assert not torch.isclose(with_support, options_only)


def test_full_vocab_rest_bin():
    # The rest bin contains exactly the mass outside the options: softmax over the K + 1 bins equals
    # the option logits minus the full logsumexp.
    lens_logits = torch.tensor([[[1.0, 0.5, -1.0]]])
    lse = torch.tensor([[3.0]])
    bins = losses.support_logits("full_vocab", lens_logits, lse)
    probs = torch.softmax(bins, -1)
    assert_close(probs[..., :3], (lens_logits - 3.0).exp(), rtol=1e-5, atol=1e-7)


def test_topk_excludes_options():
    # A top-k token that is one of the question's options is not counted twice.
    lens_logits = torch.tensor([[[2.0, 1.0]]])  # options with token ids 7 and 8
    topk_logits = torch.tensor([[[2.0, 1.5]]])  # top-2 tokens: id 7 (an option) and id 30
    topk_ids = torch.tensor([[[7, 30]]], dtype=torch.int32)
    bins = losses.support_logits("topk", lens_logits, torch.tensor([[4.0]]), topk_logits, topk_ids, torch.tensor([7, 8]))
    assert bins.shape[-1] == 2 + 2 + 1
    assert torch.isneginf(bins[0, 0, 2])
    assert float(bins[0, 0, 3]) == 1.5


def test_topk_rest_mass():
    lens_logits = torch.tensor([[[2.0, 1.0]]])
    bins = losses.support_logits("topk", lens_logits, torch.tensor([[4.0]]), torch.tensor([[[1.5]]]), torch.tensor([[[30]]]), torch.tensor([7, 8]))
    probs = torch.softmax(losses.fill_absent(bins), -1)
    listed = torch.tensor([2.0, 1.0, 1.5]).sub(4.0).exp().sum()
    assert_close(probs[0, 0, -1], 1 - listed, rtol=1e-5, atol=1e-7)


def test_shared_topk_common_tokens():
    # Only tokens in both top-k lists get their own bin; the others fall into both rest bins.
    option_logits = torch.tensor([[[0.0, 0.0]]])
    lse = torch.tensor([[2.0]])
    plm = {"lens_option_logits": option_logits, "lens_logsumexp": lse,
           "lens_topk_logits": torch.tensor([[[1.0, 0.5]]]), "lens_topk_ids": torch.tensor([[[30, 31]]])}
    polm = {"lens_option_logits": option_logits, "lens_logsumexp": lse,
            "lens_topk_logits": torch.tensor([[[0.8, 0.2]]]), "lens_topk_ids": torch.tensor([[[32, 30]]])}
    plm_bins, polm_bins = losses.shared_topk_logits(plm, polm, torch.tensor([7, 8]))
    assert float(plm_bins[0, 0, 2]) == 1.0  # token 30 is in both lists
    assert float(polm_bins[0, 0, 2]) == pytest.approx(0.2)
    assert torch.isneginf(plm_bins[0, 0, 3])  # token 31 is only in the PLM list
    assert torch.isneginf(polm_bins[0, 0, 3])


def test_unknown_support():
    with pytest.raises(ValueError, match="'vocab'"):
        losses.support_logits("vocab", torch.zeros(1, 1, 2), torch.zeros(1, 1))
