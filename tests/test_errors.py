"""Bad input through run.run_job and the pipeline functions: each error names the offending value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import CROSS_PAIR, DEFAULT_THREADS, compose_config, make_char_tokenizer, toy_questions, torch_threads
from plmcal import lens, losses, pipeline
from plmcal.data import DatasetError
from plmcal.models import ModelSpec, ModelSpecError
from plmcal.run import ConfigError, run_job


def synthetic_readout(name: str, final: torch.Tensor, lens_logits: torch.Tensor | None = None) -> pipeline.Readout:
    """A read-out built from given logits: every question has all K options."""
    n, k = final.shape
    tensors = {
        "final_option_logits": final,
        "final_logsumexp": torch.logsumexp(final, -1) + 1.0,
        "n_options": torch.full((n,), k),
        "greedy_is_option": torch.ones(n, dtype=torch.bool),
    }
    if lens_logits is not None:
        tensors["lens_option_logits"] = lens_logits
    return pipeline.Readout(ModelSpec(name=name, source="local", path="/nowhere"), tensors, list(range(k)))


def method(name: str) -> dict:
    return OmegaConf.to_container(compose_config([f"method={name}"]).method, resolve=True)


SPLIT = {"test_size": 0.7, "seed": 1}


# --- option tokens --------------------------------------------------------------------------------
def test_option_tokens_differ():
    tokenizers = {"cased": make_char_tokenizer(), "uncased": make_char_tokenizer(lowercase=True)}
    with pytest.raises(lens.LensError, match="option tokens differ"):
        pipeline.check_option_tokens(tokenizers, ["A", "B"])


def test_option_tokens_names_model():
    tokenizers = {"cased": make_char_tokenizer(), "uncased": make_char_tokenizer(lowercase=True)}
    with pytest.raises(lens.LensError) as info:
        pipeline.check_option_tokens(tokenizers, ["A", "B"])
    assert "'uncased' reads ['a', 'b']" in str(info.value)


def test_option_tokens_agree():
    tokenizers = {"one": make_char_tokenizer(), "two": make_char_tokenizer()}
    resolved = pipeline.check_option_tokens(tokenizers, ["A", "B"])
    assert resolved["one"] == resolved["two"]


def test_option_multi_token():
    with pytest.raises(lens.LensError, match="'A\\)' is 2 tokens"):
        pipeline.check_option_tokens({"cased": make_char_tokenizer()}, ["A)", "B)"])


# --- depth, agreement, finiteness -----------------------------------------------------------------
def test_depth_mismatch_synthetic():
    labels = torch.zeros(20, dtype=torch.long)
    final = torch.randn(20, 4)
    plm = synthetic_readout("plm-18", final, torch.randn(20, 18, 4))
    polm = synthetic_readout("polm-30", final, torch.randn(20, 30, 4))
    with pytest.raises(pipeline.PipelineError, match="plm-18 with 18 layers and polm-30 with 30"):
        pipeline.run_calibration(method("dual_align"), plm, polm, labels, SPLIT, seed=0)


def test_dual_align_needs_lens():
    final = torch.randn(20, 4)
    plm, polm = synthetic_readout("plm", final), synthetic_readout("polm", final)
    with pytest.raises(pipeline.PipelineError, match="readout.lens=true"):
        pipeline.run_calibration(method("dual_align"), plm, polm, torch.zeros(20, dtype=torch.long), SPLIT, seed=0)


def disagreeing_pair(n: int = 20) -> tuple[pipeline.Readout, pipeline.Readout]:
    plm = torch.tensor([[2.0, 0.0, 0.0, 0.0]]).repeat(n, 1)
    polm = torch.tensor([[0.0, 3.0, 0.0, 0.0]]).repeat(n, 1)
    return synthetic_readout("plm", plm, plm[:, None, :].repeat(1, 3, 1)), synthetic_readout("polm", polm, polm[:, None, :].repeat(1, 3, 1))


@pytest.mark.parametrize("name", ["daca", "daca_faithful", "dual_align"])
def test_empty_agreement(name):
    plm, polm = disagreeing_pair()
    with pytest.raises(losses.EmptyAgreementError, match=f"{name}: PLM and PoLM agree on none of the 6"):
        pipeline.run_calibration(method(name), plm, polm, torch.zeros(20, dtype=torch.long), SPLIT, seed=0)


def test_process_only_no_agreement_needed():
    # The process-only ablation has no confidence term, so an empty agreement set is allowed.
    plm, polm = disagreeing_pair()
    quick = {**method("dual_align_process_only"), "epochs": 3}
    result = pipeline.run_calibration(quick, plm, polm, torch.zeros(20, dtype=torch.long), SPLIT, seed=0)
    assert result["n_test"] == 14


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_final(bad):
    rows = toy_questions(4)
    final = torch.randn(4, 5)
    final[2, 1] = bad
    readout = synthetic_readout("polm-x", final)
    with pytest.raises(pipeline.PipelineError, match=r"polm-x on toy: 1 questions have NaN/inf in final_option_logits \(first ids: \['toy-2'\]\)"):
        pipeline.check_finite(readout, "toy", rows)


def test_nonfinite_lens():
    rows = toy_questions(4)
    lens_logits = torch.randn(4, 3, 5)
    lens_logits[3, 0, 0] = float("nan")
    readout = synthetic_readout("polm-x", torch.randn(4, 5), lens_logits)
    with pytest.raises(pipeline.PipelineError, match=r"lens_option_logits \(first ids: \['toy-3'\]\)"):
        pipeline.check_finite(readout, "toy", rows)


def test_absent_inf_allowed():
    # -inf in the columns past a question's option count is the absent-option marker, not an error.
    rows = toy_questions(4)
    final = torch.randn(4, 5)
    final[0, 2:] = float("-inf")
    readout = synthetic_readout("polm-x", final)
    readout.tensors["n_options"] = torch.tensor([2, 5, 5, 5])
    assert pipeline.check_finite(readout, "toy", rows) is None


# --- bad rows and config through run_job ----------------------------------------------------------
def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


GOOD = {"id": "ok-1", "question": "Which is a gas?", "options": ["ice", "steam", "rock"], "gold": 1}


def jsonl_config(path: Path, tmp_path: Path, method_name: str = "daca"):
    return compose_config(
        [
            f"pair={CROSS_PAIR}",
            "dataset=arc_easy",
            "dataset.source=jsonl",
            f"+dataset.path={path}",
            f"method={method_name}",
            "logger=none",
            f"paths.output_dir={tmp_path}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )


def test_run_missing_option(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [GOOD, {**GOOD, "id": "bad-2", "options": ["ice", None, "rock"]}])
    with pytest.raises(DatasetError, match=r"row 1 \(id 'bad-2'\): option 1 is empty or missing \(None\)"):
        run_job(jsonl_config(path, tmp_path), tmp_path)


def test_run_gold_out_of_range(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [GOOD, {**GOOD, "id": "bad-2", "gold": 3}])
    with pytest.raises(DatasetError, match=r"id 'bad-2'\): gold index 3 is out of range for 3 options"):
        run_job(jsonl_config(path, tmp_path), tmp_path)


def test_run_missing_field(tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [{k: v for k, v in GOOD.items() if k != "gold"}])
    with pytest.raises(DatasetError, match=r"missing field\(s\) \['gold'\]"):
        run_job(jsonl_config(path, tmp_path), tmp_path)


def test_run_dual_align_without_lens(tmp_path):
    cfg = compose_config([f"pair={CROSS_PAIR}", "method=dual_align", "readout.lens=false", "logger=none", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="readout.lens=true"):
        run_job(cfg, tmp_path)


def test_run_unknown_embedded(tmp_path):
    cfg = compose_config([f"pair={CROSS_PAIR}", "pair.polm.embedded=phi-9", "logger=none", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ModelSpecError, match="embedded='phi-9' is unknown"):
        run_job(cfg, tmp_path)


def test_run_missing_adapter(tmp_path):
    cfg = compose_config([f"pair={CROSS_PAIR}", f"+pair.polm.adapter={tmp_path / 'no-adapter'}", "logger=none", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ModelSpecError, match="no-adapter' has no adapter_config.json"):
        run_job(cfg, tmp_path)


@pytest.mark.slow
def test_run_depth_mismatch(embedded_cache, tmp_path):
    # The cross-family embedded pair: Gemma-3-270M has 18 layers, SmolLM2-135M-Instruct 30.
    cfg = compose_config(
        [
            f"pair={CROSS_PAIR}",
            "dataset=arc_easy",
            "dataset.limit=12",
            "method=dual_align",
            "logger=none",
            f"paths.output_dir={tmp_path}",
            f"paths.cache_dir={embedded_cache}",
        ]
    )
    with torch_threads(DEFAULT_THREADS), pytest.raises(pipeline.PipelineError, match="gemma-3-270m with 18 layers and smollm2-135m-instruct with 30"):
        run_job(cfg, tmp_path)


@pytest.mark.slow
def test_run_multi_token_option(embedded_cache, tmp_path):
    cfg = compose_config(
        [
            f"pair={CROSS_PAIR}",
            "dataset=arc_easy",
            "dataset.limit=12",
            "prompt.option_token='({letter})'",
            "method=daca",
            "logger=none",
            f"paths.output_dir={tmp_path}",
            f"paths.cache_dir={embedded_cache}",
        ]
    )
    with pytest.raises(lens.LensError, match=r"option string '\(A\)' is \d tokens"):
        run_job(cfg, tmp_path)
