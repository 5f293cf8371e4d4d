"""CAPE-style option-permutation ensembling: read the PoLM out with its options cyclically shifted,
map each shift's probabilities back to the original option order, and average them.

A shift s moves the option at original position (i + s) mod k to position i, so the option
letters stay A, B, C, ... while the option texts rotate. Each shift renders different prompts, so
each shift is its own cached read-out; its cache key carries the shift.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import torch

from plmcal import losses
from plmcal.data import MCQuestion

log = logging.getLogger(__name__)


class CapeError(ValueError):
    """An invalid CAPE setting."""


def shifts_for(permutations: int | None, n_columns: int) -> list[int]:
    """Shifts 0..P-1, where P = ``permutations`` or, when None, the option count of the longest question."""
    count = n_columns if permutations is None else int(permutations)
    if count < 1:
        raise CapeError(f"method.permutations={permutations!r} is invalid; use a whole number >= 1 or null (all {n_columns} shifts).")
    if count > n_columns:
        raise CapeError(
            f"method.permutations={count} exceeds the {n_columns} distinct cyclic shifts of the longest question; "
            f"use at most {n_columns} or null."
        )
    return list(range(count))


def rotate_question(row: MCQuestion, shift: int) -> MCQuestion:
    """Return ``row`` with its options shifted: new position i contains original option (i + shift) mod k."""
    k = len(row.options)
    s = shift % k
    options = tuple(row.options[(i + s) % k] for i in range(k))
    return replace(row, options=options, gold=(row.gold - s) % k)


def unrotate_probs(probs: torch.Tensor, n_options: torch.Tensor, shift: int) -> torch.Tensor:
    """(N, K) probabilities of a shifted read-out, put back in the original option order.

    Column i of a shifted read-out scores the original option (i + shift) mod k_n, where k_n is
    the question's own option count; columns past k_n stay 0.
    """
    n, k_max = probs.shape
    columns = torch.arange(k_max)[None, :].expand(n, k_max)  # (N, K) shifted positions i
    k = n_options.long()[:, None]  # (N, 1)
    present = columns < k
    original = torch.where(present, (columns + shift) % k.clamp(min=1), columns)  # (N, K) original position of column i
    out = torch.zeros_like(probs)
    return out.scatter(1, original, torch.where(present, probs, torch.zeros_like(probs)))


def ensemble_probs(logits_by_shift: dict[int, torch.Tensor], n_options: torch.Tensor) -> torch.Tensor:
    """(N, K) float64 mean of the option probabilities over the distinct shifts of each question.

    A question with k_n options has only k_n distinct cyclic orders: shifts that coincide modulo
    k_n (for example 0 and 4 for a 4-option question) count once.
    """
    if not logits_by_shift:
        raise CapeError("CAPE needs at least one shifted read-out.")
    first = next(iter(logits_by_shift.values()))
    total = torch.zeros(first.shape, dtype=torch.float64)
    counts = torch.zeros(first.shape[0], dtype=torch.float64)
    k = n_options.long()
    seen: list[torch.Tensor] = []  # (N,) shift mod k_n of each shift already added
    for shift, logits in sorted(logits_by_shift.items()):
        if logits.shape != first.shape:
            raise CapeError(f"the read-out of shift {shift} has shape {tuple(logits.shape)}, the others {tuple(first.shape)}.")
        residue = shift % k
        new = torch.ones_like(counts, dtype=torch.bool)
        for earlier in seen:
            new &= residue != earlier
        seen.append(residue)
        probs = torch.softmax(losses.fill_absent(logits).double(), dim=-1)
        total += unrotate_probs(probs, k, shift) * new[:, None]
        counts += new.double()
    return total / counts[:, None]


def ensemble_readouts(
    rows: list[MCQuestion],
    shifts: list[int],
    dataset_key: dict,
    read_out: Callable[[list[MCQuestion], dict], dict[str, torch.Tensor]],
    fingerprint: Callable[[list[MCQuestion]], str],
) -> torch.Tensor:
    """(N, K) ensembled PoLM probabilities; ``read_out(rows, dataset_key)`` returns a read-out's tensors.

    Shift 0 is the original question order, so its read-out is the PoLM's usual cache entry.
    """
    logits_by_shift = {}
    for shift in shifts:
        if shift == 0:
            shifted_rows, key = rows, dataset_key
        else:
            shifted_rows = [rotate_question(row, shift) for row in rows]
            key = dataset_key | {"fingerprint": fingerprint(shifted_rows), "option_permutation": f"cyclic_shift_{shift}"}
        log.info("CAPE: PoLM read-out with options shifted by %d", shift)
        logits_by_shift[shift] = read_out(shifted_rows, key)["final_option_logits"]
    n_options = torch.tensor([len(row.options) for row in rows])
    return ensemble_probs(logits_by_shift, n_options)
