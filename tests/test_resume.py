"""Sharded read-outs on a tiny random Llama: an interrupted extraction resumes without redoing shards."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from helpers import make_char_tokenizer, toy_questions
from plmcal import data, lens, models, pipeline
from plmcal.cache import ReadoutCache
from plmcal.prompt import build_prompts
from plmcal.shards import ROWS, ShardStore

# The resumed run forms the same batches as the uninterrupted one, so on one CPU thread the values
# match bit for bit. The tolerance only allows for another kernel choice in another process.
RESUME_TOL = dict(rtol=1e-5, atol=1e-6)
N_ROWS, BATCH, SHARD_BATCHES = 10, 2, 2  # 5 batches, shards of 2 + 2 + 1 batches


class Interrupted(RuntimeError):
    """Raised by the test hook to simulate a crash mid-extraction."""


class ForwardCounter:
    """Forward hook on the whole model: counts calls and rows, and can raise at a given call."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.rows, self.fail_at = 0, 0, fail_at

    def __call__(self, _module, args, kwargs, _output):
        self.calls += 1
        self.rows += kwargs["input_ids"].shape[0]
        if self.fail_at is not None and self.calls == self.fail_at:
            raise Interrupted(f"simulated crash in forward call {self.calls}")


@pytest.fixture(scope="module")
def setup(tiny_models, daca_prompt):
    model = tiny_models["llama"]
    tokenizer = make_char_tokenizer()
    rows = toy_questions(N_ROWS)
    option_ids = lens.resolve_option_ids(tokenizer, daca_prompt.option_strings(5), "tiny")
    prompts = build_prompts(tokenizer, rows, daca_prompt)
    return model, tokenizer, prompts, option_ids, [len(r.options) for r in rows]


def run(setup, shards=None, counter=None):
    model, tokenizer, prompts, option_ids, n_options = setup
    settings = lens.ReadoutSettings(batch_size=BATCH, shard_batches=SHARD_BATCHES, topk=4)
    handle = model.register_forward_hook(counter, with_kwargs=True) if counter else None
    try:
        return lens.extract(model, tokenizer, prompts, option_ids, n_options, settings, shards=shards)
    finally:
        if handle is not None:
            handle.remove()


@pytest.fixture(scope="module")
def reference(setup):
    return run(setup)


@pytest.fixture()
def interrupted(setup, tmp_path):
    """A shard store left behind by a run that crashed in its 5th (last) forward pass."""
    store = ShardStore(tmp_path / "entry.shards", {"model": "tiny", "n": N_ROWS})
    with pytest.raises(Interrupted):
        run(setup, store, ForwardCounter(fail_at=5))
    return store


def test_crash_leaves_shards(interrupted):
    assert len(interrupted.shard_paths()) == 2


def test_shards_cover_rows(interrupted):
    rows = torch.cat([shard[ROWS] for shard in interrupted.load()])
    assert rows.numel() == 2 * SHARD_BATCHES * BATCH


def test_resume_forward_calls(setup, interrupted):
    counter = ForwardCounter()
    run(setup, interrupted, counter)
    assert counter.calls == 1


def test_resume_forward_rows(setup, interrupted):
    counter = ForwardCounter()
    run(setup, interrupted, counter)
    assert counter.rows == N_ROWS - 2 * SHARD_BATCHES * BATCH


def test_resume_equals_uninterrupted(setup, interrupted, reference):
    resumed = run(setup, interrupted)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert_close(resumed[name], reference[name], **RESUME_TOL, msg=name)


def test_sharded_equals_plain(setup, reference, tmp_path):
    sharded = run(setup, ShardStore(tmp_path / "s", {"k": 1}))
    for name in reference:
        assert_close(sharded[name], reference[name], **RESUME_TOL, msg=name)


def test_complete_store_no_forward(setup, tmp_path):
    store = ShardStore(tmp_path / "s", {"k": 1})
    run(setup, store)
    counter = ForwardCounter()
    run(setup, store, counter)
    assert counter.calls == 0


def test_other_key_discarded(setup, interrupted):
    other = ShardStore(interrupted.folder, {"model": "another"})
    counter = ForwardCounter()
    run(setup, other, counter)
    assert counter.rows == N_ROWS


def test_unreadable_shard_redone(setup, interrupted):
    first = interrupted.shard_paths()[0]
    first.write_bytes(first.read_bytes()[:20])
    counter = ForwardCounter()
    run(setup, interrupted, counter)
    assert counter.rows == N_ROWS - SHARD_BATCHES * BATCH


def test_bad_shard_batches():
    with pytest.raises(ValueError, match="readout.shard_batches=0"):
        lens.ReadoutSettings(shard_batches=0)


def test_bad_engine():
    with pytest.raises(ValueError, match="readout.engine='vllm'"):
        lens.ReadoutSettings(engine="vllm")


# --- through pipeline.read_out: the cache entry is written and the shard folder removed -----------
@pytest.fixture()
def pipeline_run(tiny_model_dir, daca_prompt, tmp_path, monkeypatch):
    """``pipeline_run(fail_at)`` reads 10 toy questions of the tiny local model through the cache."""
    spec = models.ModelSpec.from_config({"name": "tiny-llama", "source": "local", "path": str(tiny_model_dir)})
    rows = toy_questions(N_ROWS)
    option_ids = lens.resolve_option_ids(make_char_tokenizer(), daca_prompt.option_strings(5), spec.name)
    key = {"name": "toy", "version": 1, "source": "test", "fingerprint": data.fingerprint(rows), "n": len(rows)}
    cache = ReadoutCache(tmp_path)
    counter = ForwardCounter()
    loaded = models.load

    def load_with_counter(*args, **kwargs):
        model, tokenizer = loaded(*args, **kwargs)
        model.register_forward_hook(counter, with_kwargs=True)
        return model, tokenizer

    monkeypatch.setattr(models, "load", load_with_counter)

    def _run(fail_at=None):
        counter.fail_at = fail_at
        settings = lens.ReadoutSettings(batch_size=BATCH, shard_batches=SHARD_BATCHES)
        return pipeline.read_out(spec, rows, [], daca_prompt, option_ids, settings, cache, key, None, "cpu")

    return _run, cache, counter


def test_pipeline_resume_rows(pipeline_run):
    run_readout, _, counter = pipeline_run
    with pytest.raises(Interrupted):
        run_readout(fail_at=4)
    rows_before = counter.rows
    run_readout()
    assert counter.rows - rows_before == N_ROWS - SHARD_BATCHES * BATCH


def test_pipeline_removes_shards(pipeline_run):
    run_readout, cache, _ = pipeline_run
    with pytest.raises(Interrupted):
        run_readout(fail_at=4)
    readout = run_readout()
    assert not cache.shard_dir(readout.key).exists()
