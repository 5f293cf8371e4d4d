"""readout.engine=lightning on a tiny random Llama: one process in-process, two DDP ranks (gloo) in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from torch.testing import assert_close

import ddp_readout
from helpers import REPO_ROOT, make_char_tokenizer, toy_questions
from plmcal import lens, predict
from plmcal.prompt import build_prompts
from plmcal.shards import ShardStore

# Both engines form the same batches; ranks differ only in the process that computes a batch.
ENGINE_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def setup(tiny_models, daca_prompt):
    tokenizer = make_char_tokenizer()
    rows = toy_questions(ddp_readout.N_ROWS)
    option_ids = lens.resolve_option_ids(tokenizer, daca_prompt.option_strings(5), "tiny")
    return tiny_models["llama"], tokenizer, build_prompts(tokenizer, rows, daca_prompt), option_ids, [len(r.options) for r in rows]


def settings(**overrides) -> lens.ReadoutSettings:
    return lens.ReadoutSettings(batch_size=ddp_readout.BATCH, shard_batches=ddp_readout.SHARD_BATCHES, topk=4, **overrides)


@pytest.fixture(scope="module")
def reference(setup):
    model, tokenizer, prompts, option_ids, n_options = setup
    return lens.extract(model, tokenizer, prompts, option_ids, n_options, settings())


def test_one_device_equals_loop(setup, reference, tmp_path):
    model, tokenizer, prompts, option_ids, n_options = setup
    store = ShardStore(tmp_path / "s", {"k": 1})
    out = predict.extract(model, tokenizer, prompts, option_ids, n_options, settings(engine="lightning", accelerator="cpu"), shards=store)
    assert out.keys() == reference.keys()
    for name in reference:
        assert_close(out[name], reference[name], **ENGINE_TOL, msg=name)


def test_lightning_resumes(setup, reference, tmp_path):
    """Two finished loop-engine shards are reused; the predict loop computes only the last batch."""
    model, tokenizer, prompts, option_ids, n_options = setup
    store = ShardStore(tmp_path / "s", {"k": 1})
    lens.extract(model, tokenizer, prompts, option_ids, n_options, settings(), shards=store)
    last = store.shard_paths()[-1]
    rows_in_last = len(load_file(str(last))["rows"])
    last.unlink()
    seen = []
    handle = model.register_forward_hook(lambda _m, _a, kwargs, _o: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        out = predict.extract(model, tokenizer, prompts, option_ids, n_options, settings(engine="lightning", accelerator="cpu"), shards=store)
    finally:
        handle.remove()
    assert sum(seen) == rows_in_last
    assert_close(out["lens_option_logits"], reference["lens_option_logits"], **ENGINE_TOL)


def test_needs_shard_store(setup):
    model, tokenizer, prompts, option_ids, n_options = setup
    with pytest.raises(ValueError, match="pass a ShardStore"):
        predict.extract(model, tokenizer, prompts, option_ids, n_options, settings(engine="lightning"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    output, shard_dir = folder / "readout.safetensors", folder / "shards"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "ddp_readout.py"), str(output), str(shard_dir)],
        cwd=REPO_ROOT / "tests", env=env, capture_output=True, text=True, timeout=300,
    )
    return completed, output, shard_dir


@pytest.mark.slow
def test_ddp_exit_code(ddp_run):
    completed, _, _ = ddp_run
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_ranks(ddp_run):
    completed, _, _ = ddp_run
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in completed.stderr + completed.stdout


@pytest.mark.slow
def test_ddp_shards_per_rank(ddp_run):
    _, _, shard_dir = ddp_run
    ranks = {path.name.split("-")[1] for path in ShardStore(shard_dir, {}).shard_paths()}
    assert ranks == {"r000", "r001"}


@pytest.mark.slow
def test_ddp_equals_loop(ddp_run, reference):
    _, output, _ = ddp_run
    merged = load_file(str(output))
    assert merged.keys() == reference.keys()
    for name in reference:
        assert_close(merged[name], reference[name], **ENGINE_TOL, msg=name)
