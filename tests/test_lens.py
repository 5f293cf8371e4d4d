"""lens.py on tiny random Llama, Qwen2 and Gemma-3 models built from configs (no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from helpers import TINY_ARCHS, TINY_LAYERS, make_char_tokenizer, toy_questions
from plmcal import lens
from plmcal.prompt import build_prompts

# Float32 results of a padded batch differ from a single-row run only by rounding.
BATCH_TOL = dict(rtol=1e-4, atol=1e-5)


def read(model, tokenizer, prompt_spec, rows, **settings):
    option_ids = lens.resolve_option_ids(tokenizer, prompt_spec.option_strings(max(len(r.options) for r in rows)), "tiny")
    prompts = build_prompts(tokenizer, rows, prompt_spec)
    out = lens.extract(model, tokenizer, prompts, option_ids, [len(r.options) for r in rows], lens.ReadoutSettings(**settings))
    return out, option_ids, prompts


@pytest.fixture(scope="module")
def rows():
    return toy_questions(6)


@pytest.fixture(scope="module")
def batched(tiny_models, daca_prompt, rows) -> dict:
    """Read-outs in one left-padded batch of 6 rows of different lengths, for every family."""
    tokenizer = make_char_tokenizer()
    return {arch: read(tiny_models[arch], tokenizer, daca_prompt, rows, batch_size=6, sort_by_length=False) for arch in TINY_ARCHS}


def present(rows) -> torch.Tensor:
    counts = torch.tensor([len(r.options) for r in rows])
    return torch.arange(5)[None, :] < counts[:, None]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_last_lens_is_logits(arch, batched):
    out, _, _ = batched[arch]
    assert_close(out["lens_option_logits"][:, -1], out["final_option_logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_logits_plain_forward(arch, batched, tiny_models, rows):
    # The read-out equals the model's own next-token logits on each unpadded prompt.
    out, option_ids, prompts = batched[arch]
    tokenizer = make_char_tokenizer()
    expected = torch.full((len(rows), 5), float("-inf"))
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            logits = tiny_models[arch](**encoded).logits[0, -1]
        expected[i, : len(row.options)] = logits[option_ids[: len(row.options)]]
    assert_close(out["final_option_logits"], expected, **BATCH_TOL)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_lse_plain_forward(arch, batched, tiny_models, rows):
    out, _, prompts = batched[arch]
    tokenizer = make_char_tokenizer()
    encoded = tokenizer(prompts[-1], return_tensors="pt")
    with torch.no_grad():
        logits = tiny_models[arch](**encoded).logits[0, -1]
    assert_close(out["final_logsumexp"][-1], torch.logsumexp(logits, -1), **BATCH_TOL)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_last_lens_lse(arch, batched):
    out, _, _ = batched[arch]
    assert_close(out["lens_logsumexp"][:, -1], out["final_logsumexp"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batch_padded(arch, batched):
    # The batch really is padded: the prompts have different token counts.
    out, _, _ = batched[arch]
    assert len(set(out["prompt_tokens"].tolist())) > 1


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("name", ["final_option_logits", "lens_option_logits", "lens_logsumexp", "final_logsumexp"])
def test_batch_equals_single(arch, name, batched, tiny_models, daca_prompt, rows):
    out, _, _ = batched[arch]
    single, _, _ = read(tiny_models[arch], make_char_tokenizer(), daca_prompt, rows, batch_size=1)
    assert_close(out[name], single[name], **BATCH_TOL)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_sorted_batches(arch, batched, tiny_models, daca_prompt, rows):
    # Sorting by length only changes the order of work, not the rows' values.
    out, _, _ = batched[arch]
    ordered, _, _ = read(tiny_models[arch], make_char_tokenizer(), daca_prompt, rows, batch_size=4, sort_by_length=True)
    assert_close(out["lens_option_logits"], ordered["lens_option_logits"], **BATCH_TOL)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_option_rows_only(arch, batched, tiny_models, daca_prompt, rows):
    out, _, _ = batched[arch]
    reduced, _, _ = read(tiny_models[arch], make_char_tokenizer(), daca_prompt, rows, batch_size=6, sort_by_length=False, full_vocab_lse=False)
    assert_close(reduced["lens_option_logits"], out["lens_option_logits"], rtol=1e-5, atol=1e-5)


def test_option_rows_no_lse(tiny_models, daca_prompt, rows):
    reduced, _, _ = read(tiny_models["llama"], make_char_tokenizer(), daca_prompt, rows, full_vocab_lse=False)
    assert "lens_logsumexp" not in reduced


def test_no_lens(tiny_models, daca_prompt, rows):
    out, _, _ = read(tiny_models["llama"], make_char_tokenizer(), daca_prompt, rows, lens=False)
    assert "lens_option_logits" not in out


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_lens_shape(arch, batched, rows):
    out, _, _ = batched[arch]
    assert tuple(out["lens_option_logits"].shape) == (len(rows), TINY_LAYERS, 5)


def test_absent_columns(batched, rows):
    out, _, _ = batched["llama"]
    assert bool(torch.isneginf(out["final_option_logits"][~present(rows)]).all())


def test_present_finite(batched, rows):
    out, _, _ = batched["llama"]
    assert bool(torch.isfinite(out["lens_option_logits"].transpose(1, 2)[present(rows)]).all())


def test_greedy_is_option(batched):
    out, option_ids, _ = batched["qwen2"]
    n = out["n_options"]
    expected = torch.tensor([int(t) in option_ids[: int(k)] for t, k in zip(out["greedy_token"], n)])
    assert torch.equal(out["greedy_is_option"], expected)


def test_softcap_applied(batched):
    # Gemma-3's final soft-capping (5.0 in the tiny config) bounds every logit.
    out, _, _ = batched["gemma3"]
    finite = out["lens_option_logits"][torch.isfinite(out["lens_option_logits"])]
    assert float(finite.abs().max()) <= 5.0


def test_option_ids(char_tokenizer):
    assert lens.resolve_option_ids(char_tokenizer, ["A", "B", "C"], "tiny") == char_tokenizer.convert_tokens_to_ids(["A", "B", "C"])


def test_multi_token_option(char_tokenizer):
    with pytest.raises(lens.LensError, match="'AB' is 2 tokens"):
        lens.resolve_option_ids(char_tokenizer, ["A", "AB"], "tiny")


def test_repeated_option_ids():
    uncased = make_char_tokenizer(lowercase=True)
    with pytest.raises(lens.LensError, match="repeated token ids"):
        lens.resolve_option_ids(uncased, ["A", "a"], "uncased")


def test_parts_missing_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(lens.LensError, match="model.layers, model.norm"):
        lens.find_parts(model)


def test_parts_missing_module():
    with pytest.raises(lens.LensError, match="Linear exposes no model.layers, model.norm, lm_head"):
        lens.find_parts(nn.Linear(4, 4))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_parts_found(arch, tiny_models):
    assert len(lens.find_parts(tiny_models[arch]).layers) == TINY_LAYERS


def test_gemma_softcap_found(tiny_models):
    assert lens.find_parts(tiny_models["gemma3"]).softcap == 5.0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_topk_final_logits(arch, tiny_models, daca_prompt, rows):
    # The last layer's top-k equals the top-k of the model's own logits on the unpadded prompt.
    out, _, prompts = read(tiny_models[arch], make_char_tokenizer(), daca_prompt, rows, batch_size=6, topk=4)
    assert out["lens_topk_logits"].shape == (len(rows), TINY_LAYERS, 4)
    encoded = make_char_tokenizer()(prompts[0], return_tensors="pt")
    with torch.no_grad():
        logits = tiny_models[arch](**encoded).logits[0, -1]
    top = torch.topk(logits, 4)
    assert_close(out["lens_topk_logits"][0, -1], top.values, **BATCH_TOL)
    assert out["lens_topk_ids"][0, -1].tolist() == top.indices.tolist()


def test_topk_needs_lse():
    with pytest.raises(ValueError, match="readout.topk=4 needs"):
        lens.ReadoutSettings(topk=4, full_vocab_lse=False)


def tiny_gemma3_multimodal():
    """A tiny random Gemma3ForConditionalGeneration: the decoder sits under model.language_model."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=TINY_LAYERS, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=16,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=127, boi_token_index=126, eoi_token_index=125)
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(config).eval()


def test_multimodal_gemma3_lens(daca_prompt, rows):
    model = tiny_gemma3_multimodal()
    assert len(lens.find_parts(model).layers) == TINY_LAYERS
    out, _, _ = read(model, make_char_tokenizer(), daca_prompt, rows, batch_size=6)
    assert_close(out["lens_option_logits"][:, -1], out["final_option_logits"], rtol=1e-5, atol=1e-5)


def test_vocab_logsumexp_matches_torch():
    logits = torch.randn(6, 3, 262144, generator=torch.Generator().manual_seed(0)) * 8
    assert_close(lens.vocab_logsumexp(logits), torch.logsumexp(logits, dim=-1), rtol=1e-6, atol=1e-5)
