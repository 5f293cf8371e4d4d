"""CAPE option-permutation ensembling: rotation of questions, mapping back to the original option
order, averaging over distinct shifts, and one end-to-end run on the real cross-family pair."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from helpers import CROSS_PAIR, DEFAULT_THREADS, compose_config, torch_threads, toy_questions
from plmcal import cape, losses
from plmcal.data import MCQuestion
from plmcal.run import run_job


def text_score(option: str) -> float:
    """A deterministic score of an option's text, independent of its position."""
    return float(sum(ord(c) for c in option) % 97) / 10.0


def position_biased_logits(rows: list[MCQuestion], bias: list[float]) -> torch.Tensor:
    """(N, K) logits of a model that scores each option's text plus a bias per letter position."""
    k_max = max(len(row.options) for row in rows)
    logits = torch.full((len(rows), k_max), float("-inf"))
    for n, row in enumerate(rows):
        for i, option in enumerate(row.options):
            logits[n, i] = text_score(option) + bias[i]
    return logits


def test_rotate_moves_gold():
    row = MCQuestion("q", "which?", ("a", "b", "c", "d"), 2)
    rotated = cape.rotate_question(row, 1)
    assert rotated.options == ("b", "c", "d", "a")
    assert rotated.options[rotated.gold] == "c"


def test_rotate_wraps_short_question():
    row = MCQuestion("q", "which?", ("a", "b", "c"), 0)
    assert cape.rotate_question(row, 4).options == cape.rotate_question(row, 1).options


def test_unrotate_inverts_rotation():
    rows = toy_questions(8)  # 2 to 5 options
    n_options = torch.tensor([len(r.options) for r in rows])
    original = torch.softmax(losses.fill_absent(position_biased_logits(rows, [0.0] * 5)), -1)
    for shift in range(5):
        rotated_rows = [cape.rotate_question(r, shift) for r in rows]
        rotated = torch.softmax(losses.fill_absent(position_biased_logits(rotated_rows, [0.0] * 5)), -1)
        assert_close(cape.unrotate_probs(rotated, n_options, shift), original, rtol=1e-6, atol=1e-7)


def test_ensemble_removes_position_bias():
    # A model with a per-letter bias, averaged over all cyclic shifts, scores each option text
    # the same whatever its position: the ensemble of the original rows equals that of rows that
    # were shifted before being asked.
    rows = [MCQuestion(f"q{i}", "which?", tuple(f"opt {i}-{j}" for j in range(4)), 0) for i in range(5)]
    bias = [2.0, 0.5, 0.0, -1.0]
    n_options = torch.full((5,), 4)
    shifts = cape.shifts_for(None, 4)
    by_shift = {s: position_biased_logits([cape.rotate_question(r, s) for r in rows], bias) for s in shifts}
    ensemble = cape.ensemble_probs(by_shift, n_options)
    moved_rows = [cape.rotate_question(r, 1) for r in rows]
    moved = cape.ensemble_probs({s: position_biased_logits([cape.rotate_question(r, s) for r in moved_rows], bias) for s in shifts}, n_options)
    assert_close(cape.unrotate_probs(moved, n_options, 1), ensemble, rtol=1e-6, atol=1e-7)


def test_ensemble_rows_sum_to_one():
    rows = toy_questions(8)
    n_options = torch.tensor([len(r.options) for r in rows])
    by_shift = {s: position_biased_logits([cape.rotate_question(r, s) for r in rows], [1.0, 0.0, 0.0, 0.0, -1.0]) for s in range(5)}
    ensemble = cape.ensemble_probs(by_shift, n_options)
    assert_close(ensemble.sum(-1), torch.ones(8, dtype=torch.float64))


def test_ensemble_counts_distinct_shifts():
    # For a 2-option question shifts 0 and 2 coincide, so shifts {0, 1, 2} average two orders, not three.
    row = MCQuestion("q", "which?", ("x", "y"), 0)
    bias = [1.0, 0.0]
    by_shift = {s: position_biased_logits([cape.rotate_question(row, s)], bias) for s in (0, 1, 2)}
    expected = cape.ensemble_probs({s: by_shift[s] for s in (0, 1)}, torch.tensor([2]))
    assert_close(cape.ensemble_probs(by_shift, torch.tensor([2])), expected)


@pytest.mark.parametrize("value", [0, 6])
def test_shifts_invalid(value):
    with pytest.raises(cape.CapeError, match=f"permutations={value}"):
        cape.shifts_for(value, 5)


@pytest.mark.slow
def test_cape_end_to_end(embedded_cache, tmp_path):
    # Two shifts on the 12 questions of the integration tests (their read-outs are shared): the shifted read-out is a new cache entry whose key names the shift.
    cfg = compose_config([
        f"pair={CROSS_PAIR}", "dataset=arc_easy", "dataset.limit=12", "method=cape", "method.permutations=2",
        "logger=none", f"paths.output_dir={tmp_path}", f"paths.cache_dir={embedded_cache}",
    ])
    with torch_threads(DEFAULT_THREADS):
        result = run_job(cfg, tmp_path / "run")
    assert result["calibrator"] == {"kind": "cape", "n_params": 0}
    assert result["temperature"] is None
    keys = [json.loads(p.read_text())["key"] for p in (embedded_cache / "readouts").rglob("meta.json")]
    shifted = [k for k in keys if k["data"].get("option_permutation") == "cyclic_shift_1" and k["data"]["n"] == 12]
    assert len(shifted) == 1
