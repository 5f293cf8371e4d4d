"""cache.py through pipeline.read_out on a tiny local model: hits, corruption, recomputation."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from helpers import make_char_tokenizer, toy_questions
from plmcal import data, lens, models, pipeline
from plmcal.cache import META_FILE, TENSOR_FILE, CacheCorruptError, ReadoutCache


class Spy:
    """Wraps a function and counts its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.fixture()
def spies(monkeypatch) -> dict[str, Spy]:
    spied = {"load": Spy(models.load), "extract": Spy(lens.extract)}
    monkeypatch.setattr(models, "load", spied["load"])
    monkeypatch.setattr(lens, "extract", spied["extract"])
    return spied


@pytest.fixture()
def reader(tiny_model_dir, daca_prompt, tmp_path):
    """``reader(rows, on_corrupt)`` reads the tiny local model out through pipeline.read_out."""
    spec = models.ModelSpec.from_config({"name": "tiny-llama", "source": "local", "path": str(tiny_model_dir)})
    option_ids = lens.resolve_option_ids(make_char_tokenizer(), daca_prompt.option_strings(5), spec.name)

    def _read(rows, on_corrupt: str = "raise", dataset: str = "toy") -> pipeline.Readout:
        key = {"name": dataset, "version": 1, "source": "test", "fingerprint": data.fingerprint(rows), "n": len(rows)}
        return pipeline.read_out(
            spec, rows, [], daca_prompt, option_ids, lens.ReadoutSettings(batch_size=4), ReadoutCache(tmp_path, on_corrupt), key, None, "cpu"
        )

    return _read


def corrupt(folder) -> None:
    path = folder / TENSOR_FILE
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def entry(readout: pipeline.Readout, tmp_path):
    return ReadoutCache(tmp_path).entry_dir(readout.key)


def test_second_call_no_load(reader, spies):
    rows = toy_questions(5)
    reader(rows)
    reader(rows)
    assert spies["load"].calls == 1


def test_second_call_no_forward(reader, spies):
    rows = toy_questions(5)
    reader(rows)
    reader(rows)
    assert spies["extract"].calls == 1


def test_hit_same_values(reader):
    rows = toy_questions(5)
    first = reader(rows)
    second = reader(rows)
    assert_close(second.tensors["lens_option_logits"], first.tensors["lens_option_logits"], rtol=0, atol=0)


def test_other_rows_miss(reader, spies):
    reader(toy_questions(5))
    reader(toy_questions(4))
    assert spies["extract"].calls == 2


def test_meta_written(reader, tmp_path):
    readout = reader(toy_questions(3))
    meta = json.loads((entry(readout, tmp_path) / META_FILE).read_text())
    assert meta["option_ids"] == readout.option_ids


def test_corrupt_raises(reader, tmp_path):
    rows = toy_questions(4)
    folder = entry(reader(rows), tmp_path)
    corrupt(folder)
    with pytest.raises(CacheCorruptError, match="sha256"):
        reader(rows)


def test_corrupt_names_folder(reader, tmp_path):
    rows = toy_questions(4)
    folder = entry(reader(rows), tmp_path)
    corrupt(folder)
    with pytest.raises(CacheCorruptError) as info:
        reader(rows)
    assert str(folder) in str(info.value)


def test_corrupt_no_forward(reader, spies, tmp_path):
    # In raise mode nothing is recomputed and the entry is kept for inspection.
    rows = toy_questions(4)
    folder = entry(reader(rows), tmp_path)
    corrupt(folder)
    with pytest.raises(CacheCorruptError):
        reader(rows)
    assert spies["extract"].calls == 1


def test_recompute(reader, spies, tmp_path):
    rows = toy_questions(4)
    corrupt(entry(reader(rows), tmp_path))
    reader(rows, on_corrupt="recompute")
    assert spies["extract"].calls == 2


def test_recompute_values(reader, tmp_path):
    rows = toy_questions(4)
    first = reader(rows)
    corrupt(entry(first, tmp_path))
    again = reader(rows, on_corrupt="recompute")
    assert_close(again.tensors["final_option_logits"], first.tensors["final_option_logits"], rtol=1e-5, atol=1e-6)


def test_recompute_rewrites(reader, spies, tmp_path):
    # After the recomputation the entry is valid again: the next read is a hit.
    rows = toy_questions(4)
    corrupt(entry(reader(rows), tmp_path))
    reader(rows, on_corrupt="recompute")
    reader(rows)
    assert spies["extract"].calls == 2


def test_other_entry_survives(reader, spies, tmp_path):
    damaged, intact = toy_questions(4), toy_questions(3, prefix="intact")
    corrupt(entry(reader(damaged), tmp_path))
    reader(intact)
    reader(damaged, on_corrupt="recompute")
    reader(intact)
    # Three forward passes: damaged, intact, then damaged again. The second read of intact is a hit.
    assert spies["extract"].calls == 3


def test_edited_meta(reader, tmp_path):
    rows = toy_questions(3)
    folder = entry(reader(rows), tmp_path)
    meta = json.loads((folder / META_FILE).read_text())
    meta["key"]["dataset"] = "edited"
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CacheCorruptError, match="stored key differs"):
        reader(rows)


def test_missing_tensor_file(reader, tmp_path):
    rows = toy_questions(3)
    folder = entry(reader(rows), tmp_path)
    (folder / TENSOR_FILE).unlink()
    with pytest.raises(CacheCorruptError, match="missing"):
        reader(rows)


def test_save_load_roundtrip(tmp_path):
    cache = ReadoutCache(tmp_path)
    tensors = {"x": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([1, 2])}
    cache.save({"model": "m", "dataset": "d", "v": 1}, tensors)
    assert_close(cache.load({"model": "m", "dataset": "d", "v": 1})["x"], tensors["x"], rtol=0, atol=0)


def test_miss_is_none(tmp_path):
    assert ReadoutCache(tmp_path).load({"model": "m", "dataset": "d"}) is None


def test_bad_on_corrupt(tmp_path):
    with pytest.raises(ValueError, match="'ignore'"):
        ReadoutCache(tmp_path, on_corrupt="ignore")
