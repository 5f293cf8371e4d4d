"""data.py: row validation, every offline dataset config, hub loading (mocked), JSON lines."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import datasets
import pytest

from helpers import CONF_DIR, compose_config
from plmcal import data
from plmcal.data import DatasetError, MCQuestion, load_jsonl, load_questions, save_jsonl

# Configs whose default source is an offline copy (TruthfulQA-MC and MathQA default to their hub ids).
OFFLINE = sorted(
    p.stem for p in (CONF_DIR / "dataset").glob("*.yaml") if compose_config([f"dataset={p.stem}"]).dataset.source == "offline"
)


def good_row(i: int = 0, k: int = 4) -> MCQuestion:
    return MCQuestion(f"q{i}", f"What is {i}?", tuple(f"answer {j}" for j in range(k)), 0)


BAD_ROWS = {
    "missing option": (dataclasses.replace(good_row(), options=("a", None, "c")), "option 1 is empty or missing"),
    "empty option": (dataclasses.replace(good_row(), options=("a", "  ", "c")), "option 1 is empty or missing"),
    "gold too large": (dataclasses.replace(good_row(), gold=4), "gold index 4 is out of range"),
    "gold negative": (dataclasses.replace(good_row(), gold=-1), "gold index -1 is out of range"),
    "gold bool": (dataclasses.replace(good_row(), gold=True), "gold index True"),
    "one option": (good_row(k=1), "1 options"),
    "eleven options": (good_row(k=11), "11 options"),
    "empty question": (dataclasses.replace(good_row(), question="   "), "question text is empty"),
    "no question": (dataclasses.replace(good_row(), question=None), "question text is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_validate_rejects(case):
    row, message = BAD_ROWS[case]
    with pytest.raises(DatasetError, match=message):
        data.validate([good_row(1), row], "toy")


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_validate_names_row(case):
    row, _ = BAD_ROWS[case]
    with pytest.raises(DatasetError, match=r"dataset 'toy', row 1 \(id 'q0'\)"):
        data.validate([good_row(1), row], "toy")


def test_duplicate_ids():
    with pytest.raises(DatasetError, match="duplicate id"):
        data.validate([good_row(3), good_row(3)], "toy")


def test_no_rows():
    with pytest.raises(DatasetError, match="no rows"):
        data.validate([], "toy")


@pytest.mark.parametrize("k", [2, 10])
def test_validate_accepts(k):
    rows = [good_row(0, k), good_row(1, k)]
    assert data.validate(rows, "toy") == rows


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_loads(name, offline_data, asset_cache):
    cfg = compose_config([f"dataset={name}", "dataset.limit=7"]).dataset
    rows = data.load_questions(cfg, str(asset_cache))
    assert len(rows) == 7


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_valid(name, offline_data, asset_cache):
    cfg = compose_config([f"dataset={name}", "dataset.limit=7"]).dataset
    rows = data.load_questions(cfg, str(asset_cache))
    assert data.validate(list(rows), name) == rows


def test_slice_spreads_subjects(offline_data, asset_cache):
    cfg = compose_config(["dataset=mmlu_slice", "dataset.limit=20"]).dataset
    rows = data.load_questions(cfg, str(asset_cache))
    assert len({row.subject for row in rows}) == 20


def test_sciq_gold_varies(offline_data, asset_cache):
    # SciQ stores the correct option apart from the distractors, so the shuffle must move it between letters.
    cfg = compose_config(["dataset=sciq", "dataset.limit=40"]).dataset
    rows = data.load_questions(cfg, str(asset_cache))
    assert len({row.gold for row in rows}) == 4


def test_sciq_order_fixed(offline_data, asset_cache):
    cfg = compose_config(["dataset=sciq", "dataset.limit=10"]).dataset
    assert data.load_questions(cfg, str(asset_cache)) == data.load_questions(cfg, str(asset_cache))


def test_bad_limit(offline_data, asset_cache):
    cfg = compose_config(["dataset=arc_easy", "dataset.limit=0"]).dataset
    with pytest.raises(DatasetError, match="dataset.limit=0"):
        data.load_questions(cfg, str(asset_cache))


def test_bad_source():
    cfg = compose_config(["dataset=arc_easy", "dataset.source=ftp"]).dataset
    with pytest.raises(DatasetError, match="'ftp'"):
        data.load_questions(cfg)


def test_missing_offline_folder(offline_data, asset_cache):
    cfg = compose_config(["dataset=arc_easy", "dataset.offline_path=ai2_arc/ARC-Nope/validation"]).dataset
    with pytest.raises(DatasetError, match="ARC-Nope"):
        data.load_questions(cfg, str(asset_cache))


def test_unknown_adapter():
    with pytest.raises(DatasetError, match="'nope'"):
        data._adapt([{}], "nope", "toy")


def test_adapter_bad_row():
    with pytest.raises(DatasetError, match="row 0"):
        data._adapt([{"question": "q"}], "mmlu", "toy")


def test_answer_key_unknown():
    raw = {"id": "x", "question": "q?", "choices": {"label": ["A", "B"], "text": ["a", "b"]}, "answerKey": "E"}
    with pytest.raises(DatasetError, match="answer key 'E'"):
        data._adapt([raw], "arc", "toy")


# --- hub source, mocked -----------------------------------------------------------------------------
ARC_RAW = [
    {"id": "hub-1", "question": "Which is a gas?", "choices": {"label": ["A", "B", "C"], "text": ["ice", "steam", "rock"]}, "answerKey": "B"},
    {"id": "hub-2", "question": "Which is hot?", "choices": {"label": ["1", "2", "3", "4"], "text": ["sun", "snow", "ice", "sea"]}, "answerKey": "1"},
]


class FakeHub:
    """Stands in for ``datasets.load_dataset``: records each call and returns prepared rows."""

    def __init__(self, rows_by_config: dict):
        self.rows_by_config, self.calls = rows_by_config, []

    def __call__(self, path, name=None, split=None, revision=None, **kwargs):
        self.calls.append({"path": path, "name": name, "split": split, "revision": revision, **kwargs})
        return list(self.rows_by_config[name])


@pytest.fixture()
def arc_hub(monkeypatch) -> FakeHub:
    fake = FakeHub({"ARC-Easy": ARC_RAW})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def hub_arc_config():
    return compose_config(["dataset=arc_easy", "dataset.source=hub", "dataset.hub.revision=0123abcd"]).dataset


def test_hub_call(arc_hub):
    data.load_questions(hub_arc_config())
    assert arc_hub.calls == [{"path": "allenai/ai2_arc", "name": "ARC-Easy", "split": "validation", "revision": "0123abcd"}]


def test_hub_rows(arc_hub):
    rows = data.load_questions(hub_arc_config())
    assert rows == [
        MCQuestion("hub-1", "Which is a gas?", ("ice", "steam", "rock"), 1),
        MCQuestion("hub-2", "Which is hot?", ("sun", "snow", "ice", "sea"), 0),
    ]


def test_hub_limit(arc_hub):
    cfg = compose_config(["dataset=arc_easy", "dataset.source=hub", "dataset.limit=1"]).dataset
    assert len(data.load_questions(cfg)) == 1


def test_hub_subject_configs(monkeypatch):
    raw = [{"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": "s"}]
    fake = FakeHub({"anatomy": raw, "virology": raw})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    cfg = compose_config(["dataset=mmlu", "dataset.source=hub", "dataset.subjects=[anatomy,virology]"]).dataset
    data.load_questions(cfg)
    assert [call["name"] for call in fake.calls] == ["anatomy", "virology"]


def test_hub_invalid_row(monkeypatch):
    bad = [dict(ARC_RAW[0], choices={"label": ["A", "B"], "text": ["ice", ""]}, answerKey="A")]
    monkeypatch.setattr(datasets, "load_dataset", FakeHub({"ARC-Easy": bad}))
    with pytest.raises(DatasetError, match="option 1 is empty"):
        data.load_questions(hub_arc_config())


def test_hub_needs_path():
    cfg = compose_config(["dataset=arc_easy", "dataset.source=hub", "dataset.hub.path=null"]).dataset
    with pytest.raises(DatasetError, match="hub.path"):
        data.load_questions(cfg)


# --- JSON lines -------------------------------------------------------------------------------------
def test_jsonl_roundtrip(tmp_path: Path):
    rows = [good_row(0, 2), good_row(1, 10)]
    data.save_jsonl(rows, tmp_path / "rows.jsonl")
    assert data.load_jsonl(tmp_path / "rows.jsonl", "toy") == rows


def test_jsonl_missing_field(tmp_path: Path):
    (tmp_path / "rows.jsonl").write_text('{"id": "a", "question": "q", "options": ["x", "y"]}\n')
    with pytest.raises(DatasetError, match=r"line 1 .* missing field\(s\) \['gold'\]"):
        data.load_jsonl(tmp_path / "rows.jsonl", "toy")


def test_fingerprint_changes():
    assert data.fingerprint([good_row(0)]) != data.fingerprint([dataclasses.replace(good_row(0), gold=1)])


def test_jsonl_config_loads(tmp_path):
    path = tmp_path / "questions.jsonl"
    save_jsonl([good_row(0), good_row(1, k=3)], path)
    cfg = compose_config(["dataset=jsonl", f"dataset.path={path}", "dataset.name=mine"])
    rows = load_questions(cfg.dataset)
    assert [row.id for row in rows] == [good_row(0).id, good_row(1).id]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": 1, "question": "q", "options": "ABCD", "gold": 0}', "must be a list"),
        ('{"id": 1, "question": "q", "options": ["a", "b"], "gold": "B"}', "0-based index"),
        ('{"id": 1, "question": "q", "options": ["a", 2], "gold": 0}', "must be a string"),
        ('{"id": 1, "question": "q", "options": ["a", "b"], "gold": 0', "invalid JSON"),
    ],
)
def test_jsonl_bad_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DatasetError, match=message):
        load_jsonl(path, "bad")


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_jsonl(tmp_path / "absent.jsonl", "absent")
