"""Logit-lens read-out at the answer position: per-layer option logits from one forward pass.

The lens of layer l applies the model's own final norm and unembedding to the hidden state that
decoder layer l outputs, at the last prompt position (the position whose next token is the answer).
For the last layer this reproduces the model's real logits, which the tests check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class LensError(RuntimeError):
    """The model does not expose what the lens needs, or an option token is invalid."""


@dataclass
class ModelParts:
    """The pieces of a decoder-only model that the lens uses."""

    layers: nn.ModuleList
    final_norm: nn.Module
    unembed: nn.Module  # maps (…, D) hidden states to (…, V) logits
    softcap: float | None  # Gemma-2-style final logit soft-capping, None when the model has none


def find_parts(model: nn.Module) -> ModelParts:
    """Locate the decoder layers, the final norm and the unembedding, or raise naming what is missing."""
    backbone = getattr(model, "model", None)
    # PEFT wraps the model once more; the lens reads the merged base.
    if backbone is not None and not hasattr(backbone, "layers") and hasattr(backbone, "model"):
        backbone = backbone.model
    # Multimodal checkpoints (Gemma-3 4B-27B load as Gemma3ForConditionalGeneration in transformers 5)
    # keep the decoder under model.language_model; the lens reads that text decoder.
    if backbone is not None and not hasattr(backbone, "layers") and hasattr(backbone, "language_model"):
        backbone = backbone.language_model
    layers = getattr(backbone, "layers", None)
    norm = getattr(backbone, "norm", None)
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    missing = [name for name, part in (("model.layers", layers), ("model.norm", norm), ("lm_head", unembed)) if part is None]
    if missing:
        raise LensError(
            f"{type(model).__name__} exposes no {', '.join(missing)}; the logit lens supports decoder-only "
            "models whose backbone has `layers` and a final `norm` (Llama, Qwen2, Gemma-3, Mistral, ...)."
        )
    text_config = getattr(model.config, "text_config", None)
    softcap = getattr(model.config, "final_logit_softcapping", None) or getattr(text_config, "final_logit_softcapping", None)
    return ModelParts(layers, norm, unembed, softcap)


def resolve_option_ids(tokenizer: Any, option_strings: Sequence[str], model_name: str) -> list[int]:
    """Map each option string (e.g. "A") to its single token id, or raise when it is not one token."""
    ids = []
    for text in option_strings:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            raise LensError(
                f"option string {text!r} is {len(encoded)} tokens {pieces} in the tokenizer of {model_name!r}; "
                "the read-out needs one token per option. Change `prompt.option_token` (e.g. ' {letter}' with a "
                "leading space) or the letters."
            )
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise LensError(f"option strings {list(option_strings)} map to repeated token ids {ids} in {model_name!r}.")
    return ids


@dataclass
class ReadoutSettings:
    """Settings that change the read-out values; all of them enter the cache key."""

    batch_size: int = 8
    dtype: str = "float32"
    lens: bool = True  # per-layer option logits; off for final-layer-only pairs
    full_vocab_lse: bool = True  # per-layer logsumexp over the whole vocabulary (option mass)
    sort_by_length: bool = True  # batches of similar length waste less compute on padding
    topk: int = 0  # per-layer top-k vocabulary logits and ids (the "topk" support of Dual-Align); 0 = off

    def __post_init__(self):
        if int(self.batch_size) < 1:
            raise ValueError(f"readout.batch_size={self.batch_size!r} is invalid; use a positive count.")
        if int(self.topk) < 0 or int(self.topk) != float(self.topk):
            raise ValueError(f"readout.topk={self.topk!r} is invalid; use 0 (off) or a positive whole number such as 16.")
        if int(self.topk) > 0 and not (self.lens and self.full_vocab_lse):
            raise ValueError(f"readout.topk={self.topk} needs readout.lens=true and readout.full_vocab_lse=true; set readout.topk=0 otherwise.")

    def key(self) -> dict:
        # batch_size and sorting change results only by float rounding; they stay out of the key.
        key = {"dtype": self.dtype, "lens": self.lens, "full_vocab_lse": self.full_vocab_lse}
        if int(self.topk) > 0:
            key["topk"] = int(self.topk)
        return key


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits


def _bias_rows(unembed: nn.Module, index: torch.Tensor) -> torch.Tensor | None:
    bias = getattr(unembed, "bias", None)
    return None if bias is None else bias[index]


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.inference_mode()
def extract(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    option_ids: Sequence[int],
    n_options: Sequence[int],
    settings: ReadoutSettings,
    add_special_tokens: bool = True,
    description: str = "read-out",
) -> dict[str, torch.Tensor]:
    """Run one forward pass per prompt and return the read-out tensors (all on CPU, float32).

    Returns (N questions, L layers, K = len(option_ids)):
      final_option_logits (N, K): the model's real next-token logits on the option tokens;
      lens_option_logits (N, L, K): logit-lens logits on the option tokens, layer 1..L;
      lens_logsumexp (N, L) and final_logsumexp (N,): logsumexp over the full vocabulary;
      lens_topk_logits (N, L, k) and lens_topk_ids (N, L, k), when settings.topk = k > 0;
      greedy_token (N,): argmax over the full vocabulary; prompt_tokens (N,).
    Option columns past a question's own option count are set to -inf.

    NOTE: the official DACA code reads vLLM's top-4 log-probabilities instead of logits. The two
    differ by one constant per question, so the softmax over the options is the same.
    """
    parts = find_parts(model)
    device = next(model.parameters()).device
    option_index = torch.tensor(list(option_ids), device=device)
    n_layers = len(parts.layers)
    n_prompts, k_max = len(prompts), len(option_ids)

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # the answer position is then the last column of every row

    lengths = [len(tokenizer.encode(p, add_special_tokens=add_special_tokens)) for p in prompts]
    order = sorted(range(n_prompts), key=lambda i: -lengths[i]) if settings.sort_by_length else list(range(n_prompts))

    out = {
        "final_option_logits": torch.empty(n_prompts, k_max),
        "final_logsumexp": torch.empty(n_prompts),
        "greedy_token": torch.empty(n_prompts, dtype=torch.long),
        "prompt_tokens": torch.tensor(lengths, dtype=torch.long),
    }
    if settings.lens:
        out["lens_option_logits"] = torch.empty(n_prompts, n_layers, k_max)
        if settings.full_vocab_lse:
            out["lens_logsumexp"] = torch.empty(n_prompts, n_layers)
        if int(settings.topk) > 0:
            out["lens_topk_logits"] = torch.empty(n_prompts, n_layers, int(settings.topk))
            out["lens_topk_ids"] = torch.empty(n_prompts, n_layers, int(settings.topk), dtype=torch.int32)

    captured: list[torch.Tensor] = []

    def keep_last_position(_module, _inputs, output):
        captured.append(_layer_output(output)[:, -1, :])  # (B, D): only the answer position is kept

    hooks = [layer.register_forward_hook(keep_last_position) for layer in parts.layers] if settings.lens else []
    try:
        batches = [order[i : i + settings.batch_size] for i in range(0, n_prompts, settings.batch_size)]
        for batch in tqdm(batches, desc=description, unit="batch", leave=False):
            captured.clear()
            encoded = tokenizer(
                [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
            ).to(device)
            # Positions must ignore the left padding, or a padded row would see shifted rotary positions.
            position_ids = (encoded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=encoded["input_ids"],
                attention_mask=encoded["attention_mask"],
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=1,
            ).logits[:, -1, :].float()  # (B, V)
            rows = torch.tensor(batch)
            out["final_option_logits"][rows] = logits[:, option_index].cpu()
            out["final_logsumexp"][rows] = torch.logsumexp(logits, dim=-1).cpu()
            out["greedy_token"][rows] = logits.argmax(dim=-1).cpu()
            if settings.lens:
                if len(captured) != n_layers:
                    raise LensError(f"captured {len(captured)} layer outputs, expected {n_layers}; a layer ran twice or not at all.")
                normed = parts.final_norm(torch.stack(captured, dim=1))  # (B, L, D)
                if settings.full_vocab_lse:
                    lens_logits = _softcap(parts.unembed(normed).float(), parts.softcap)  # (B, L, V)
                    out["lens_option_logits"][rows] = lens_logits[..., option_index].cpu()
                    out["lens_logsumexp"][rows] = torch.logsumexp(lens_logits, dim=-1).cpu()
                    if int(settings.topk) > 0:
                        top = torch.topk(lens_logits, int(settings.topk), dim=-1)
                        out["lens_topk_logits"][rows] = top.values.cpu()
                        out["lens_topk_ids"][rows] = top.indices.to(torch.int32).cpu()
                else:
                    # Only the K option rows of the unembedding: (B, L, D) @ (D, K).
                    option_logits = nn.functional.linear(normed, parts.unembed.weight[option_index], _bias_rows(parts.unembed, option_index))
                    out["lens_option_logits"][rows] = _softcap(option_logits.float(), parts.softcap).cpu()
    finally:
        for hook in hooks:
            hook.remove()

    # Columns beyond each question's option count are not options of that question.
    counts = torch.tensor(list(n_options), dtype=torch.long)
    absent = torch.arange(k_max)[None, :] >= counts[:, None]  # (N, K)
    out["final_option_logits"][absent] = float("-inf")
    if settings.lens:
        out["lens_option_logits"][absent[:, None, :].expand(-1, n_layers, -1)] = float("-inf")
    out["n_options"] = counts
    is_option = (out["greedy_token"][:, None] == torch.tensor(list(option_ids))[None, :]) & ~absent  # (N, K)
    out["greedy_is_option"] = is_option.any(dim=-1)
    return out
