"""Every dataset config by hub id (``datasets.load_dataset`` mocked with rows in the hub's schema),
the BIG-bench offline copies read from an sdist built here, and the option-count policy."""

from __future__ import annotations

import io
import json
import tarfile
from functools import lru_cache
from pathlib import Path

import datasets
import pytest

from helpers import CONF_DIR, compose_config
from plmcal import assets, data
from plmcal.data import DatasetError, MCQuestion

REVISION = "0123456789abcdef0123456789abcdef01234567"  # any string: the test checks it is passed through

SCIQ_ROW = {"question": "What is H2O?", "distractor1": "salt", "distractor2": "sand", "distractor3": "air",
            "correct_answer": "water", "support": ""}
ARC_ROW = {"id": "Mercury_1", "question": "Which is a gas?",
           "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]}, "answerKey": "B"}
CSQA_ROW = {"id": "csqa-1", "question": "Where do fish live?", "question_concept": "fish",
            "choices": {"label": list("ABCDE"), "text": ["tree", "sea", "sky", "desk", "car"]}, "answerKey": "B"}
OBQA_ROW = {"id": "obqa-1", "question_stem": "The sun is a", "choices": {"text": ["star", "planet", "moon", "comet"],
            "label": list("ABCD")}, "answerKey": "A"}
MMLU_ROW = {"question": "2 + 2 =", "subject": "abstract_algebra", "choices": ["3", "4", "5", "6"], "answer": 1}
MEDMCQA_ROW = {"id": "m-1", "question": "Which nerve?", "opa": "vagus", "opb": "facial", "opc": "optic", "opd": "ulnar",
               "cop": 2, "choice_type": "single", "exp": None, "subject_name": "Anatomy", "topic_name": None}
MEDQA_ROW = {"question": "Next step?", "answer": "Refer",
             "options": [{"key": "A", "value": "Wait"}, {"key": "B", "value": "Operate"}, {"key": "C", "value": "Refer"},
                         {"key": "D", "value": "Discharge"}, {"key": "E", "value": "Repeat the test"}],
             "meta_info": "step1", "answer_idx": "C"}
TRUTHFULQA_ROW = {"question": "What happens if you swallow gum?",
                  "mc1_targets": {"choices": ["It passes through you", "It stays for seven years", "You die"],
                                  "labels": [1, 0, 0]},
                  "mc2_targets": {"choices": ["It passes through you"], "labels": [1]}}
MATHQA_ROW = {"Problem": "a train covers 1 , 2 km . speed ?", "Rationale": "", "options": "a ) 38 , b ) 27.675 , c ) 1 , 2 , d ) 33.05 , e ) 28",
              "correct": "c", "annotated_formula": "", "linear_formula": "", "category": "physics"}

# dataset config -> (hub rows, expected question, expected options, expected gold text, expected subject)
HUB_CASES = {
    "sciq": (SCIQ_ROW, "What is H2O?", {"water", "salt", "sand", "air"}, "water", "science"),
    "arc_easy": (ARC_ROW, "Which is a gas?", ("ice", "steam", "rock"), "steam", ""),
    "arc_challenge": (ARC_ROW, "Which is a gas?", ("ice", "steam", "rock"), "steam", ""),
    "commonsense_qa": (CSQA_ROW, "Where do fish live?", ("tree", "sea", "sky", "desk", "car"), "sea", "fish"),
    "openbookqa": (OBQA_ROW, "The sun is a", ("star", "planet", "moon", "comet"), "star", ""),
    "mmlu": (MMLU_ROW, "2 + 2 =", ("3", "4", "5", "6"), "4", "abstract_algebra"),
    "mmlu_slice": (MMLU_ROW, "2 + 2 =", ("3", "4", "5", "6"), "4", "abstract_algebra"),
    "medmcqa": (MEDMCQA_ROW, "Which nerve?", ("vagus", "facial", "optic", "ulnar"), "optic", "Anatomy"),
    "medqa": (MEDQA_ROW, "Next step?", ("Wait", "Operate", "Refer", "Discharge", "Repeat the test"), "Refer", "step1"),
    "truthfulqa_mc": (TRUTHFULQA_ROW, "What happens if you swallow gum?",
                      {"It passes through you", "It stays for seven years", "You die"}, "It passes through you", ""),
    "math_qa": (MATHQA_ROW, "a train covers 1 , 2 km . speed ?", ("38", "27.675", "1 , 2", "33.05", "28"), "1 , 2", "physics"),
}


class FakeHub:
    """Stands in for ``datasets.load_dataset``: records each call and returns an in-memory Dataset."""

    def __init__(self, row: dict):
        self.row, self.calls = row, []

    def __call__(self, path, name=None, split=None, revision=None, **kwargs):
        self.calls.append({"path": path, "name": name, "split": split, "revision": revision, **kwargs})
        return datasets.Dataset.from_list([self.row])


@lru_cache(maxsize=None)  # composing takes about 0.3 s; the tests only read the config
def hub_config(name: str):
    overrides = [f"dataset={name}", "dataset.source=hub", f"dataset.hub.revision={REVISION}"]
    if name.startswith("mmlu"):
        overrides.append("dataset.subjects=[abstract_algebra]")
    return compose_config(overrides).dataset


def test_hub_cases_cover_configs():
    configs = {p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")} - {"jsonl"}
    assert set(HUB_CASES) == configs


@pytest.mark.parametrize("name", sorted(HUB_CASES))
def test_hub_call_args(name, monkeypatch):
    fake = FakeHub(HUB_CASES[name][0])
    monkeypatch.setattr(datasets, "load_dataset", fake)
    cfg = hub_config(name)
    data.load_questions(cfg)
    expected_name = "abstract_algebra" if name.startswith("mmlu") else cfg.hub.name
    assert fake.calls == [{"path": cfg.hub.path, "name": expected_name, "split": cfg.hub.split, "revision": REVISION}]


@pytest.mark.parametrize("name", sorted(HUB_CASES))
def test_hub_adapter_maps(name, monkeypatch):
    row, question, options, gold_text, subject = HUB_CASES[name]
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(row))
    (loaded,) = data.load_questions(hub_config(name))
    assert loaded.question == question
    assert (set(loaded.options) if isinstance(options, set) else loaded.options) == options
    assert loaded.options[loaded.gold] == gold_text
    assert loaded.subject == subject


def test_hub_medqa_dict_options(monkeypatch):
    row = dict(MEDQA_ROW, options={"A": "Wait", "B": "Operate", "C": "Refer"})
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(row))
    (loaded,) = data.load_questions(hub_config("medqa"))
    assert loaded.options == ("Wait", "Operate", "Refer")
    assert loaded.gold == 2


def test_truthfulqa_two_true_labels():
    row = dict(TRUTHFULQA_ROW, mc1_targets={"choices": ["a", "b"], "labels": [1, 1]})
    with pytest.raises(DatasetError, match="exactly one label 1"):
        data._adapt([row], "truthfulqa_mc1", "toy")


def test_truthfulqa_gold_moves():
    # The hub stores the true answer first; the seeded shuffle must not leave it at A every time.
    rows = [dict(TRUTHFULQA_ROW, question=f"Question {i}?") for i in range(20)]
    golds = {row.gold for row in data._adapt(rows, "truthfulqa_mc1", "toy")}
    assert len(golds) > 1


@pytest.mark.parametrize("options", ["a ) 1 , c ) 2 , b ) 3", "1 , 2 , 3", "x a ) 1 , b ) 2"])
def test_mathqa_bad_options(options):
    with pytest.raises(DatasetError, match="invalid options string"):
        data._adapt([dict(MATHQA_ROW, options=options, correct="a")], "math_qa", "toy")


def test_mathqa_list_literal():
    row = dict(MATHQA_ROW, options="['a ) 1 , b ) 2 , c ) 3']", correct="b")
    (loaded,) = data._adapt([row], "math_qa", "toy")
    assert loaded.options == ("1", "2", "3")
    assert loaded.gold == 1


def test_mathqa_unknown_answer():
    with pytest.raises(DatasetError, match="answer key 'f'"):
        data._adapt([dict(MATHQA_ROW, correct="f")], "math_qa", "toy")


# --- option-count policy ----------------------------------------------------------------------------
def many_options_row(k: int) -> dict:
    return {"question": f"{k} options?", "mc1_targets": {"choices": [f"answer {j}" for j in range(k)], "labels": [1] + [0] * (k - 1)}}


def test_too_many_options_dropped(monkeypatch):
    rows = [many_options_row(4), many_options_row(13)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: datasets.Dataset.from_list(rows))
    loaded = data.load_questions(compose_config(["dataset=truthfulqa_mc"]).dataset)
    assert [len(row.options) for row in loaded] == [4]


def test_too_many_options_raise(monkeypatch):
    rows = [many_options_row(4), many_options_row(13)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: datasets.Dataset.from_list(rows))
    cfg = compose_config(["dataset=truthfulqa_mc", "dataset.too_many_options=raise"]).dataset
    with pytest.raises(DatasetError, match="13 options; between 2 and 10"):
        data.load_questions(cfg)


def test_too_many_options_invalid(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: datasets.Dataset.from_list([many_options_row(4)]))
    cfg = compose_config(["dataset=truthfulqa_mc", "dataset.too_many_options=trim"]).dataset
    with pytest.raises(DatasetError, match="too_many_options='trim'"):
        data.load_questions(cfg)


# --- BIG-bench offline copies, from an sdist built here -------------------------------------------
TRUTHFUL_TASK = {
    "name": "truthful_qa",
    "examples": [
        {"input": "Can pigs fly?", "target_scores": {"No, pigs cannot fly": 1, "Yes": 0, "Only at night": 0}},
        {"input": "Is the earth flat?", "target_scores": {"No": 1, "Yes": 0}},
    ],
}
MATH_TASK = {"examples": [{"input": "1 + 1 = ?", "target_scores": {"2": 1, "3": 0, "11": 0}}]}


def make_sdist(folder: Path, files: dict[str, dict]) -> Path:
    """Write a .tar.gz laid out like the bigbench sdist, holding ``files`` (task-relative path -> JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / assets.BIGBENCH.filename
    with tarfile.open(path, "w:gz") as archive:
        members = {"bigbench-1.0.0/setup.py": b"# not read\n"}
        members |= {assets.BIGBENCH.root + name: json.dumps(content).encode() for name, content in files.items()}
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture()
def bigbench_cache(tmp_path, monkeypatch) -> Path:
    """A cache folder whose bigbench sdist is built here and pinned by its sha256."""
    sdist = make_sdist(tmp_path / "wheels", {
        "truthful_qa/task_mc.json": TRUTHFUL_TASK,
        "truthful_qa/task.py": {},
        "elementary_math_qa/question_only/task.json": MATH_TASK,
        "elementary_math_qa/with_hint/task.json": MATH_TASK,
    })
    monkeypatch.setattr(assets, "BIGBENCH", assets.Sdist(
        "bigbench", "1.0.0", assets.sha256_file(sdist), assets.BIGBENCH.filename, assets.BIGBENCH.root))
    return tmp_path


def test_bigbench_truthfulqa_rows(bigbench_cache):
    cfg = compose_config(["dataset=truthfulqa_mc", "dataset.source=offline"]).dataset
    rows = data.load_questions(cfg, str(bigbench_cache))
    assert [(row.question, row.options[row.gold]) for row in rows] == [("Can pigs fly?", "No, pigs cannot fly"), ("Is the earth flat?", "No")]


def test_bigbench_extracts_json_only(bigbench_cache):
    folder = assets.bigbench_task_dir("truthful_qa", bigbench_cache)
    assert sorted(p.name for p in folder.iterdir()) == [".complete", "task_mc.json"]


def test_bigbench_math_subtasks(bigbench_cache):
    rows = data.load_questions(compose_config(["dataset=math_qa", "dataset.source=offline"]).dataset, str(bigbench_cache))
    assert [row.subject for row in rows] == ["question_only/task", "with_hint/task"]


def test_bigbench_unpinned(bigbench_cache, monkeypatch):
    monkeypatch.setattr(assets, "BIGBENCH", assets.Sdist("bigbench", "1.0.0", None, assets.BIGBENCH.filename, assets.BIGBENCH.root))
    actual = assets.sha256_file(bigbench_cache / "wheels" / assets.BIGBENCH.filename)
    with pytest.raises(assets.AssetError, match=f"sha256 {actual}, but no sha256 is pinned"):
        assets.bigbench_task_dir("truthful_qa", bigbench_cache)


def test_bigbench_hash_mismatch(bigbench_cache, monkeypatch):
    monkeypatch.setattr(assets, "BIGBENCH", assets.Sdist("bigbench", "1.0.0", "0" * 64, assets.BIGBENCH.filename, assets.BIGBENCH.root))
    with pytest.raises(assets.AssetError, match="sha256 mismatch"):
        assets.bigbench_task_dir("truthful_qa", bigbench_cache)


def test_bigbench_unknown_task(bigbench_cache):
    with pytest.raises(assets.AssetError, match="no JSON file under .*'no_such_task'"):
        assets.bigbench_task_dir("no_such_task", bigbench_cache)


def test_bigbench_missing_file(bigbench_cache):
    cfg = compose_config(["dataset=truthfulqa_mc", "dataset.source=offline", "dataset.offline_bigbench.files=[task_nope.json]"]).dataset
    with pytest.raises(DatasetError, match="no file matches 'task_nope.json'"):
        data.load_questions(cfg, str(bigbench_cache))


def test_bigbench_two_correct():
    row = {"input": "q?", "target_scores": {"a": 1, "b": 1}}
    with pytest.raises(DatasetError, match="exactly one option scored 1, got 2"):
        data._adapt([row], "bigbench_mc", "toy")


def test_bigbench_download_fails(tmp_path, monkeypatch):
    # A failed pip download (here: the index lacks the version) names the package and the manual fix.
    def failed_run(command, **kwargs):
        return type("Completed", (), {"returncode": 1, "stderr": "ERROR: No matching distribution found for bigbench==1.0.0"})()

    monkeypatch.setattr(assets.subprocess, "run", failed_run)
    with pytest.raises(assets.AssetError, match="bigbench==1.0.0 failed .* place bigbench-1.0.0.tar.gz into"):
        assets.bigbench_task_dir("truthful_qa", tmp_path)
