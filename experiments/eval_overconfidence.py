"""Compare the calibration of the Gemma-3-270M base (PLM) with base + LoRA adapter (PoLM).

For every question the prompt is rendered with the DACA prompt and run through the model once
(batched, left padding, explicit position ids, ``logits_to_keep=1``). The logits of the option
letter tokens ("A", "B", ...) at the last position are soft-maxed over the options. Per dataset the
script reports accuracy, mean top-label confidence and ECE (10 equal-width bins), writes them to
``<adapter>/eval.json`` and prints a markdown table.

Base-model read-outs are cached under ``$PLMCAL_CACHE/overconfidence`` because they do not change
between adapter attempts. The key is the model folder, the prompt digest and the row fingerprint.

Example::

    PYTHONPATH=src PLMCAL_CACHE=/tmp/plmcache python experiments/eval_overconfidence.py \\
        --adapter experiments/adapters/gemma-3-270m-sft-dpo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from plmcal import assets
from plmcal.data import MCQuestion, fingerprint, load_questions
from plmcal.prompt import PromptSpec

log = logging.getLogger("eval_overconfidence")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADAPTER = REPO_ROOT / "experiments" / "adapters" / "gemma-3-270m-sft-dpo"
DEFAULT_PROMPT = REPO_ROOT / "conf" / "prompt" / "daca.yaml"

MMLU_SUBJECTS = [
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management",
    "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
]

# Evaluation sets. None of them is used for training (the adapter is trained on HellaSwag,
# SocialIQA and PIQA only).
DATASETS: dict[str, dict[str, Any]] = {
    "sciq": {"name": "sciq", "adapter": "sciq", "offline_path": "sciq/none/validation"},
    "arc_easy": {"name": "arc_easy", "adapter": "arc", "offline_path": "ai2_arc/ARC-Easy/validation"},
    "mmlu": {
        "name": "mmlu",
        "adapter": "mmlu",
        "offline_path": "hails/mmlu_no_train/{subject}/test",
        "subjects": MMLU_SUBJECTS,
        "limit": 300,
    },
    "commonsense_qa": {
        "name": "commonsense_qa",
        "adapter": "commonsense_qa",
        "offline_path": "tau/commonsense_qa/none/validation",
    },
    "openbookqa": {"name": "openbookqa", "adapter": "openbookqa", "offline_path": "openbookqa/main/validation"},
}
DEFAULT_DATASETS = ["sciq", "arc_easy", "mmlu", "commonsense_qa", "openbookqa"]

N_BINS = 10


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """Compute the top-label ECE with equal-width bins [0, 0.1), ..., [0.9, 1.0].

    A confidence of exactly 1.0 falls into the last bin.
    """
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
            total += in_bin.mean() * gap
    return float(total)


def summarize(probabilities: list[np.ndarray], rows: list[MCQuestion]) -> dict[str, float]:
    """Return accuracy, mean top-label confidence and ECE for one model on one dataset."""
    confidence = np.array([p.max() for p in probabilities])
    predicted = np.array([int(p.argmax()) for p in probabilities])
    gold = np.array([row.gold for row in rows])
    correct = (predicted == gold).astype(float)
    return {
        "n": len(rows),
        "accuracy": float(correct.mean()),
        "mean_confidence": float(confidence.mean()),
        "ece": expected_calibration_error(confidence, correct),
    }


def letter_token_ids(tokenizer: Any, spec: PromptSpec, n_options: int) -> list[int]:
    """Return the single token id of each option letter, or raise if a letter is not one token."""
    ids = []
    for text in spec.option_strings(n_options):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"option string {text!r} is {len(encoded)} tokens {encoded}; the read-out needs one token.")
        ids.append(encoded[0])
    return ids


@torch.inference_mode()
def option_probabilities(
    model: Any, tokenizer: Any, spec: PromptSpec, rows: list[MCQuestion], batch_size: int
) -> list[np.ndarray]:
    """Run one forward pass per question and return the softmax over its option-letter logits."""
    prompts = [spec.render(row) for row in rows]
    encoded = [tokenizer.encode(text) for text in prompts]  # the Gemma tokenizer prepends <bos>
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i]))  # less padding per batch
    pad_id = tokenizer.pad_token_id
    results: list[np.ndarray | None] = [None] * len(rows)

    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for slot, i in enumerate(batch):
            ids = encoded[i]
            input_ids[slot, width - len(ids) :] = torch.tensor(ids)  # left padding
            attention_mask[slot, width - len(ids) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=1,
        ).logits[:, -1, :].float()
        for slot, i in enumerate(batch):
            letter_ids = letter_token_ids(tokenizer, spec, len(rows[i].options))
            results[i] = torch.softmax(logits[slot, letter_ids], dim=-1).numpy()
    return results  # type: ignore[return-value]


def load_model(model_dir: Path, adapter_dir: Path | None) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.eval()


def base_cache_path(model_dir: Path, spec: PromptSpec, dataset: str, rows: list[MCQuestion]) -> Path:
    key = hashlib.sha256(f"{model_dir.resolve()}|{spec.digest()}|{fingerprint(rows)}".encode()).hexdigest()[:16]
    return assets.cache_root() / "overconfidence" / f"base-{dataset}-{key}.json"


def evaluate_dataset(
    name: str, rows: list[MCQuestion], base: Any, polm: Any, tokenizer: Any, spec: PromptSpec,
    model_dir: Path, batch_size: int,
) -> dict[str, Any]:
    cache = base_cache_path(model_dir, spec, name, rows)
    if cache.exists():
        base_probs = [np.array(p) for p in json.loads(cache.read_text())]
        log.info("%s: base read-outs taken from cache %s", name, cache)
    else:
        started = time.time()
        base_probs = option_probabilities(base, tokenizer, spec, rows, batch_size)
        log.info("%s: base model read %d questions in %.0f s", name, len(rows), time.time() - started)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps([p.tolist() for p in base_probs]))

    started = time.time()
    polm_probs = option_probabilities(polm, tokenizer, spec, rows, batch_size)
    log.info("%s: adapted model read %d questions in %.0f s", name, len(rows), time.time() - started)

    plm_metrics = summarize(base_probs, rows)
    polm_metrics = summarize(polm_probs, rows)
    more_overconfident = (
        polm_metrics["ece"] > plm_metrics["ece"] and polm_metrics["mean_confidence"] > polm_metrics["accuracy"]
    )
    return {"plm": plm_metrics, "polm": polm_metrics, "polm_more_overconfident": bool(more_overconfident)}


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| dataset | n | PLM acc | PLM conf | PLM ECE | PoLM acc | PoLM conf | PoLM ECE | PoLM more over-confident |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        plm, polm = entry["plm"], entry["polm"]
        lines.append(
            f"| {name} | {plm['n']} | {plm['accuracy']:.3f} | {plm['mean_confidence']:.3f} | {plm['ece']:.3f} "
            f"| {polm['accuracy']:.3f} | {polm['mean_confidence']:.3f} | {polm['ece']:.3f} "
            f"| {'yes' if entry['polm_more_overconfident'] else 'no'} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, default=DEFAULT_ADAPTER, help="LoRA adapter folder (default: %(default)s)")
    parser.add_argument("--model", default="gemma-3-270m", help="embedded base model name (default: %(default)s)")
    parser.add_argument("--prompt", type=Path, default=DEFAULT_PROMPT, help="prompt config YAML (default: %(default)s)")
    parser.add_argument(
        "--datasets", nargs="+", default=DEFAULT_DATASETS, choices=sorted(DATASETS),
        help="evaluation datasets (default: %(default)s)",
    )
    parser.add_argument("--mmlu-limit", type=int, default=300, help="questions in the MMLU slice (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per forward pass (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--output", type=Path, default=None, help="result JSON (default: <adapter>/eval.json)"
    )
    return parser.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.adapter / "adapter_config.json").exists():
        raise SystemExit(f"adapter not found: {args.adapter} has no adapter_config.json; run post_train.py first.")

    from transformers import AutoTokenizer

    model_dir = assets.converted_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = PromptSpec.from_config(OmegaConf.load(args.prompt))
    base = load_model(model_dir, None)
    polm = load_model(model_dir, args.adapter)

    results: dict[str, dict[str, Any]] = {}
    for name in args.datasets:
        cfg = dict(DATASETS[name])
        if name == "mmlu":
            cfg["limit"] = args.mmlu_limit
        rows = load_questions(OmegaConf.create(cfg))
        results[name] = evaluate_dataset(name, rows, base, polm, tokenizer, spec, model_dir, args.batch_size)
        log.info("%s: %s", name, json.dumps(results[name]))

    output = args.output or args.adapter / "eval.json"
    payload = {
        "model": args.model,
        "adapter": str(args.adapter.resolve().relative_to(REPO_ROOT)) if args.adapter.resolve().is_relative_to(REPO_ROOT) else str(args.adapter),
        "prompt": spec.name,
        "prompt_digest": spec.digest(),
        "ece_bins": N_BINS,
        "results": results,
        "all_polm_more_overconfident": all(entry["polm_more_overconfident"] for entry in results.values()),
    }
    output.write_text(json.dumps(payload, indent=1) + "\n")
    log.info("wrote %s", output)
    record_in_training_json(args.adapter / "training.json", payload)
    print(markdown_table(results))


def record_in_training_json(path: Path, payload: dict[str, Any]) -> None:
    """Store the results in the attempt of training.json that produced the evaluated adapter."""
    if not path.exists():
        log.warning("%s not found; the results are only in eval.json.", path)
        return
    record = json.loads(path.read_text())
    summary = {
        "all_polm_more_overconfident": payload["all_polm_more_overconfident"],
        "results": payload["results"],
    }
    matched = False
    for attempt in record.get("attempts", []):
        if attempt.get("recipe_id") == record.get("recipe_id"):
            attempt["evaluation"] = summary
            matched = True
    if not matched:
        log.warning("%s has no attempt with recipe_id %s; the results are only in eval.json.", path, record.get("recipe_id"))
        return
    path.write_text(json.dumps(record, indent=1) + "\n")
    log.info("added the results to the current attempt in %s", path)


if __name__ == "__main__":
    main()
