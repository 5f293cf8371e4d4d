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

from plmcal.shards import ShardStore, fill_from_shards, finished_rows

log = logging.getLogger(__name__)


ENGINES = ("loop", "lightning")


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
    """Read-out settings. Those that change the values enter the cache key (``key()``)."""

    batch_size: int = 8
    dtype: str = "float32"
    lens: bool = True  # per-layer option logits; off for final-layer-only pairs
    full_vocab_lse: bool = True  # per-layer logsumexp over the whole vocabulary (option mass)
    sort_by_length: bool = True  # batches of similar length waste less compute on padding
    topk: int = 0  # per-layer top-k vocabulary logits and ids (the "topk" support of Dual-Align); 0 = off
    shard_batches: int = 16  # batches per shard file; an interrupted read-out resumes after its last shard
    engine: str = "loop"  # loop: one process; lightning: Lightning's predict loop over `devices`
    devices: int = 1  # processes (CPU) or accelerators of the lightning engine
    strategy: str = "ddp"  # Lightning strategy of the lightning engine when devices > 1
    accelerator: str = "auto"  # Lightning accelerator of the lightning engine (cpu, gpu, auto)

    def __post_init__(self):
        if int(self.batch_size) < 1:
            raise ValueError(f"readout.batch_size={self.batch_size!r} is invalid; use a positive count.")
        if int(self.topk) < 0 or int(self.topk) != float(self.topk):
            raise ValueError(f"readout.topk={self.topk!r} is invalid; use 0 (off) or a positive whole number such as 16.")
        if int(self.topk) > 0 and not (self.lens and self.full_vocab_lse):
            raise ValueError(f"readout.topk={self.topk} needs readout.lens=true and readout.full_vocab_lse=true; set readout.topk=0 otherwise.")
        if int(self.shard_batches) < 1 or int(self.shard_batches) != float(self.shard_batches):
            raise ValueError(f"readout.shard_batches={self.shard_batches!r} is invalid; use a positive whole number of batches per shard.")
        if self.engine not in ENGINES:
            raise ValueError(f"readout.engine={self.engine!r} is invalid; use one of {list(ENGINES)}.")
        if int(self.devices) < 1:
            raise ValueError(f"readout.devices={self.devices!r} is invalid; use a positive number of devices.")

    def key(self) -> dict:
        # batch_size, sorting, sharding and the engine change results only by float rounding; they stay out of the key.
        key = {"dtype": self.dtype, "lens": self.lens, "full_vocab_lse": self.full_vocab_lse}
        if int(self.topk) > 0:
            key["topk"] = int(self.topk)
        return key


def vocab_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis, computed as x_0 - log_softmax(x)_0.

    Same value up to float rounding. On CPU, torch.logsumexp over a 262k vocabulary was 5x slower than
    log_softmax (0.35 s against 0.07 s for 144 rows, torch 2.13, 2 cores): exp of the many very
    negative shifted logits produces denormals, which log_softmax's kernel avoids.
    """
    return logits[..., 0] - torch.log_softmax(logits, dim=-1)[..., 0]


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits


def _bias_rows(unembed: nn.Module, index: torch.Tensor) -> torch.Tensor | None:
    bias = getattr(unembed, "bias", None)
    return None if bias is None else bias[index]


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def token_lengths(tokenizer: Any, prompts: Sequence[str], add_special_tokens: bool) -> list[int]:
    return [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]


def batch_order(lengths: Sequence[int], settings: ReadoutSettings) -> list[int]:
    """Question indices in processing order: longest first when sorting, so each batch pads little."""
    indices = range(len(lengths))
    return sorted(indices, key=lambda i: -lengths[i]) if settings.sort_by_length else list(indices)


def chunks(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def allocate(n_prompts: int, n_layers: int, k_max: int, settings: ReadoutSettings) -> dict[str, torch.Tensor]:
    """Empty (N, ...) tensors for every per-question value that the read-out computes."""
    out = {
        "final_option_logits": torch.empty(n_prompts, k_max),
        "final_logsumexp": torch.empty(n_prompts),
        "greedy_token": torch.empty(n_prompts, dtype=torch.long),
    }
    if settings.lens:
        out["lens_option_logits"] = torch.empty(n_prompts, n_layers, k_max)
        if settings.full_vocab_lse:
            out["lens_logsumexp"] = torch.empty(n_prompts, n_layers)
        if int(settings.topk) > 0:
            out["lens_topk_logits"] = torch.empty(n_prompts, n_layers, int(settings.topk))
            out["lens_topk_ids"] = torch.empty(n_prompts, n_layers, int(settings.topk), dtype=torch.int32)
    return out


class LensReader:
    """Reads one batch of prompts: one forward pass, hooks on the decoder layers, the lens at the last position.

    Use it as a context manager: the layer hooks exist only inside the ``with`` block.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, option_ids: Sequence[int], settings: ReadoutSettings, add_special_tokens: bool = True):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.add_special_tokens = add_special_tokens
        self.parts = find_parts(model)
        self.n_layers = len(self.parts.layers)
        # With device_map the layers may sit on several devices; the lens runs where the final norm is.
        self.input_device = model.get_input_embeddings().weight.device
        self.lens_device = next(self.parts.final_norm.parameters(), self.parts.unembed.weight).device
        self.option_index = torch.tensor(list(option_ids), device=self.parts.unembed.weight.device)
        self.captured: list[torch.Tensor] = []
        self.hooks: list[Any] = []
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # the answer position is then the last column of every row

    def __enter__(self) -> "LensReader":
        if self.settings.lens:
            self.hooks = [layer.register_forward_hook(self._keep_last_position) for layer in self.parts.layers]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _keep_last_position(self, _module, _inputs, output):
        self.captured.append(_layer_output(output)[:, -1, :].to(self.lens_device))  # (B, D): only the answer position

    @torch.inference_mode()
    def read_batch(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Return this batch's read-out rows on CPU (float32 values), in the order of ``prompts``."""
        settings, parts, option_index = self.settings, self.parts, self.option_index
        self.captured.clear()

        encoded = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=self.add_special_tokens).to(self.input_device)
        # Positions must ignore the left padding, or a padded row would see shifted rotary positions.
        position_ids = (encoded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=1,
        ).logits[:, -1, :].float()  # (B, V)

        index = option_index.to(logits.device)
        out = {
            "final_option_logits": logits[:, index].cpu(),
            "final_logsumexp": vocab_logsumexp(logits).cpu(),
            "greedy_token": logits.argmax(dim=-1).cpu(),
        }
        if not settings.lens:
            return out

        if len(self.captured) != self.n_layers:
            raise LensError(f"captured {len(self.captured)} layer outputs, expected {self.n_layers}; a layer ran twice or not at all.")
        normed = parts.final_norm(torch.stack(self.captured, dim=1))  # (B, L, D)
        self.captured.clear()
        if settings.full_vocab_lse:
            lens_logits = _softcap(parts.unembed(normed.to(parts.unembed.weight.device)).float(), parts.softcap)  # (B, L, V)
            out["lens_option_logits"] = lens_logits[..., option_index].cpu()
            out["lens_logsumexp"] = vocab_logsumexp(lens_logits).cpu()
            if int(settings.topk) > 0:
                top = torch.topk(lens_logits, int(settings.topk), dim=-1)
                out["lens_topk_logits"] = top.values.cpu()
                out["lens_topk_ids"] = top.indices.to(torch.int32).cpu()
        else:
            # Only the K option rows of the unembedding: (B, L, D) @ (D, K).
            weight = parts.unembed.weight
            option_logits = nn.functional.linear(normed.to(weight.device), weight[option_index], _bias_rows(parts.unembed, option_index))
            out["lens_option_logits"] = _softcap(option_logits.float(), parts.softcap).cpu()
        return out


def finalize(out: dict[str, torch.Tensor], lengths: Sequence[int], option_ids: Sequence[int], n_options: Sequence[int]) -> dict[str, torch.Tensor]:
    """Mark absent option columns with -inf and add the per-question counts and flags."""
    k_max = len(option_ids)
    counts = torch.tensor(list(n_options), dtype=torch.long)
    # Columns beyond each question's option count are not options of that question.
    absent = torch.arange(k_max)[None, :] >= counts[:, None]  # (N, K)
    out["final_option_logits"][absent] = float("-inf")
    if "lens_option_logits" in out:
        n_layers = out["lens_option_logits"].shape[1]
        out["lens_option_logits"][absent[:, None, :].expand(-1, n_layers, -1)] = float("-inf")
    out["prompt_tokens"] = torch.tensor(list(lengths), dtype=torch.long)
    out["n_options"] = counts
    is_option = (out["greedy_token"][:, None] == torch.tensor(list(option_ids))[None, :]) & ~absent  # (N, K)
    out["greedy_is_option"] = is_option.any(dim=-1)
    return out


def extract(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    option_ids: Sequence[int],
    n_options: Sequence[int],
    settings: ReadoutSettings,
    add_special_tokens: bool = True,
    description: str = "read-out",
    shards: ShardStore | None = None,
) -> dict[str, torch.Tensor]:
    """Run one forward pass per prompt and return the read-out tensors (all on CPU, float32).

    Returns (N questions, L layers, K = len(option_ids)):
      final_option_logits (N, K): the model's real next-token logits on the option tokens;
      lens_option_logits (N, L, K): logit-lens logits on the option tokens, layer 1..L;
      lens_logsumexp (N, L) and final_logsumexp (N,): logsumexp over the full vocabulary;
      lens_topk_logits (N, L, k) and lens_topk_ids (N, L, k), when settings.topk = k > 0;
      greedy_token (N,): argmax over the full vocabulary; prompt_tokens (N,).
    Option columns past a question's own option count are set to -inf.

    With ``shards``, every ``settings.shard_batches`` batches are written as one shard file, and the
    rows of shards already on disk (from an interrupted run) are loaded instead of computed.

    NOTE: the official DACA code reads vLLM's top-4 log-probabilities instead of logits. The two
    differ by one constant per question, so the softmax over the options is the same.
    """
    lengths = token_lengths(tokenizer, prompts, add_special_tokens)
    order = batch_order(lengths, settings)
    reader = LensReader(model, tokenizer, option_ids, settings, add_special_tokens)
    out = allocate(len(prompts), reader.n_layers, len(option_ids), settings)

    done: set[int] = set()
    if shards is not None:
        shards.prepare()
        finished = shards.load()
        fill_from_shards(out, finished)
        done = finished_rows(finished)
        if done:
            log.info("%s: resuming, %d of %d questions loaded from %d shards in %s", description, len(done), len(prompts), len(finished), shards.folder)
    todo = [i for i in order if i not in done]
    batches = chunks(todo, int(settings.batch_size))
    shard_rows: list[int] = []
    with reader:
        for number, batch in enumerate(tqdm(batches, desc=description, unit="batch", leave=False), start=1):
            rows = torch.tensor(batch)
            for name, values in reader.read_batch([prompts[i] for i in batch]).items():
                out[name][rows] = values
            shard_rows += batch
            if shards is not None and (number % int(settings.shard_batches) == 0 or number == len(batches)):
                index = torch.tensor(shard_rows)
                shards.write(index, {name: values[index] for name, values in out.items()})
                shard_rows = []
    return finalize(out, lengths, option_ids, n_options)
