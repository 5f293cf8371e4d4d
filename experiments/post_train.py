"""Build the project's post-trained model (PoLM): Gemma-3-270M base + LoRA SFT + DPO.

Training data are letter-format multiple-choice questions from HellaSwag, SocialIQA and PIQA only
(disjoint from the evaluation sets SciQ, ARC, MMLU, CommonsenseQA, OpenBookQA and MedMCQA),
rendered with the DACA prompt, which ends in "Answer: ".

* SFT (``trl.SFTTrainer``): the completion is the gold letter; only that token is in the loss.
* DPO (``trl.DPOTrainer`` on the PEFT model from SFT): chosen is the gold letter, rejected is a
  wrong letter drawn with the seed. The SFT adapter is the frozen reference.

The answer is the bare letter token ("A", "B", ...) that follows the prompt's tokens, which is the
token the evaluation reads. Both trainers would tokenize prompt + completion as one string, where
" A" merges into the single token "▁A". This script therefore tokenizes prompt and completion
separately, and both trainer subclasses compute their loss from one forward pass over the prompt.

The final adapter (the "default" LoRA adapter, weights stored as float16) and ``training.json`` are
written to ``--output-dir``. ``training.json`` keeps the ``attempts`` list of earlier runs into the
same folder. ``eval_overconfidence.py`` adds its table to the matching attempt.

Reproduce the shipped adapter (``--threads 1``: on a machine whose cores are shared with other
jobs, two torch threads measured about five times slower than one)::

    PYTHONPATH=src PLMCAL_CACHE=/tmp/plmcache python experiments/post_train.py --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from plmcal import assets
from plmcal.data import MCQuestion, load_questions
from plmcal.prompt import PromptSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_overconfidence import letter_token_ids, option_probabilities, summarize  # noqa: E402

log = logging.getLogger("post_train")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "experiments" / "adapters" / "gemma-3-270m-sft-dpo"
DEFAULT_PROMPT = REPO_ROOT / "conf" / "prompt" / "daca.yaml"

TRAIN_SOURCES: dict[str, dict[str, str]] = {
    "hellaswag": {"name": "hellaswag", "adapter": "hellaswag", "offline_path": "hellaswag/none/validation"},
    "social_iqa": {"name": "social_iqa", "adapter": "social_iqa", "offline_path": "social_i_qa/none/validation"},
    "piqa": {"name": "piqa", "adapter": "piqa", "offline_path": "piqa/plain_text/validation"},
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- data


def load_source(name: str) -> list[MCQuestion]:
    """Load one training source as validated rows."""
    return load_questions(OmegaConf.create(TRAIN_SOURCES[name]))


def split_sources(
    tokenizer: Any, spec: PromptSpec, args: argparse.Namespace
) -> tuple[dict[str, list[MCQuestion]], dict[str, list[MCQuestion]], dict[str, list[MCQuestion]], dict[str, Any]]:
    """Return per-source (SFT, DPO, held-out) rows and a summary of the sizes.

    Held-out rows are never trained on. SFT and DPO rows are disjoint unless a source has too
    few rows.

    Each source contributes the same number of rows to each stage, so the mixture does not follow
    HellaSwag's larger size. Prompts longer than ``--max-prompt-tokens`` are dropped first. By
    default a stage gets enough rows for one epoch. A smaller ``--sft-rows-per-source`` or
    ``--dpo-pairs-per-source`` makes the trainer loop over the rows for several epochs.
    """
    rng = random.Random(args.seed)
    sources = list(TRAIN_SOURCES)
    sft_per_source = args.sft_rows_per_source or math.ceil(args.sft_steps * args.batch_size / len(sources))
    dpo_per_source = args.dpo_pairs_per_source or math.ceil(args.dpo_steps * args.batch_size / len(sources))
    sft, dpo, held_out, sizes = {}, {}, {}, {}
    for name in sources:
        rows = load_source(name)
        short_enough = [row for row in rows if len(tokenizer.encode(spec.render(row))) <= args.max_prompt_tokens]
        rng.shuffle(short_enough)
        held_out[name] = short_enough[: args.holdout_per_source]
        rest = short_enough[args.holdout_per_source :]
        if len(rest) < sft_per_source + dpo_per_source:
            # SFT takes the first rows and DPO the last ones, so the two stages share some questions.
            log.warning(
                "%s: %d rows after the hold-out, fewer than the %d SFT + %d DPO rows requested, so the SFT and "
                "DPO rows overlap. Lower --sft-steps / --dpo-steps or raise --max-prompt-tokens to keep them disjoint.",
                name, len(rest), sft_per_source, dpo_per_source,
            )
            sft[name] = rest[:sft_per_source]
            dpo[name] = rest[-dpo_per_source:]
        else:
            sft[name] = rest[:sft_per_source]
            dpo[name] = rest[sft_per_source : sft_per_source + dpo_per_source]
        sizes[name] = {
            "rows": len(rows),
            "rows_within_max_prompt_tokens": len(short_enough),
            "held_out": len(held_out[name]),
            "sft": len(sft[name]),
            "dpo": len(dpo[name]),
        }
        log.info("%s: %s", name, sizes[name])
    return sft, dpo, held_out, sizes


def prompt_ids(tokenizer: Any, spec: PromptSpec, row: MCQuestion) -> list[int]:
    return tokenizer.encode(spec.render(row))  # the Gemma tokenizer prepends <bos>


def sft_dataset(tokenizer: Any, spec: PromptSpec, rows: list[MCQuestion], seed: int) -> Any:
    """Tokenize each prompt. The ``labels`` list contains one target token, the gold letter."""
    from datasets import Dataset

    records = []
    for row in rows:
        letter = letter_token_ids(tokenizer, spec, len(row.options))[row.gold]
        records.append({"input_ids": prompt_ids(tokenizer, spec, row), "labels": [letter]})
    return Dataset.from_list(records).shuffle(seed=seed)


def dpo_dataset(tokenizer: Any, spec: PromptSpec, rows: list[MCQuestion], seed: int) -> Any:
    """Tokenize prompt, chosen (gold letter) and rejected (a seeded draw among the wrong letters)."""
    from datasets import Dataset

    rng = random.Random(seed)
    records = []
    for row in rows:
        letters = letter_token_ids(tokenizer, spec, len(row.options))
        wrong = rng.choice([k for k in range(len(row.options)) if k != row.gold])
        records.append(
            {"prompt_ids": prompt_ids(tokenizer, spec, row), "chosen_ids": [letters[row.gold]], "rejected_ids": [letters[wrong]]}
        )
    return Dataset.from_list(records).shuffle(seed=seed)


# Both stages score a single answer token after the prompt. The TRL 1.16 trainers instead run
# prompt + completion through the model (DPO twice, once for chosen and once for rejected) and
# project the hidden states through the 262,144-token LM head with a chunked kernel. Profiled on
# two CPU cores shared with another job, an SFT step at batch 8 took 25-33 s, about 8 s of it in
# that kernel's backward pass. The subclasses below keep the trainers' loops, optimizers,
# reference adapter and logging. They compute the SFT cross-entropy and the sigmoid DPO loss from
# one forward pass over the prompt with ``logits_to_keep=1``, because the next-token distribution
# at the last prompt position is the distribution of the answer token. Unlike TRL's default, no
# EOS token follows the letter.


@dataclass
class LastTokenCollator:
    """Left-pad prompts and collect the answer token ids (SFT target, or DPO chosen / rejected)."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompt_key = "prompt_ids" if "prompt_ids" in examples[0] else "input_ids"
        prompts = [example[prompt_key] for example in examples]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        }
        if prompt_key == "input_ids":
            batch["target_ids"] = torch.tensor([example["labels"][0] for example in examples])
        else:
            batch["chosen_token_ids"] = torch.tensor([example["chosen_ids"][0] for example in examples])
            batch["rejected_token_ids"] = torch.tensor([example["rejected_ids"][0] for example in examples])
        return batch


def answer_log_probs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return log-softmax over the full vocabulary at the last prompt position, shape (batch, vocab)."""
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=1,
        use_cache=False,
    ).logits[:, -1, :]
    return torch.log_softmax(logits.float(), dim=-1)


def pick(log_probs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    return log_probs.gather(1, token_ids[:, None]).squeeze(1)


def letter_sft_trainer_class() -> type:
    from trl import SFTTrainer

    class LetterSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is the cross-entropy of the gold letter after the prompt."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            log_probs = answer_log_probs(model, inputs)
            target = inputs["target_ids"]
            loss = -pick(log_probs, target).mean()
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["mean_token_accuracy"].append((log_probs.argmax(-1) == target).float().mean().item())
            return (loss, None) if return_outputs else loss

    return LetterSFTTrainer


def letter_dpo_trainer_class() -> type:
    import torch.nn.functional as F
    from trl import DPOTrainer
    from trl.trainer.utils import use_adapter

    class LetterDPOTrainer(DPOTrainer):
        """DPOTrainer with the sigmoid DPO loss on one answer token per example.

        Datasets come already tokenized into prompt_ids / chosen_ids / rejected_ids.
        """

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: ANN001
            missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names)
            if missing:
                raise ValueError(f"the {dataset_name} preference dataset lacks the columns {sorted(missing)}.")
            return dataset

        def _compute_loss(self, model, inputs, return_outputs):  # noqa: ANN001
            if self.loss_types != ["sigmoid"] or self.label_smoothing or self.f_divergence_type != "reverse_kl":
                raise ValueError("LetterDPOTrainer implements only loss_type=['sigmoid'] with reverse KL and no label smoothing.")
            mode = "train" if self.model.training else "eval"
            log_probs = answer_log_probs(model, inputs)
            chosen_logps = pick(log_probs, inputs["chosen_token_ids"])
            rejected_logps = pick(log_probs, inputs["rejected_token_ids"])

            # The reference is the SFT adapter: DPOTrainer copied it into the frozen adapter "ref".
            unwrapped = self.accelerator.unwrap_model(self.model)
            with torch.no_grad(), use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                ref_log_probs = answer_log_probs(self.model, inputs)
            chosen_logratios = chosen_logps - pick(ref_log_probs, inputs["chosen_token_ids"])
            rejected_logratios = rejected_logps - pick(ref_log_probs, inputs["rejected_token_ids"])
            loss = -F.logsigmoid(self.beta * (chosen_logratios - rejected_logratios)).mean()

            chosen_rewards = self.beta * chosen_logratios.detach()
            rejected_rewards = self.beta * rejected_logratios.detach()
            metrics = self._metrics[mode]
            metrics["rewards/chosen"].append(chosen_rewards.mean().item())
            metrics["rewards/rejected"].append(rejected_rewards.mean().item())
            metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
            metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
            metrics["logps/chosen"].append(chosen_logps.detach().mean().item())
            metrics["logps/rejected"].append(rejected_logps.detach().mean().item())
            metrics["mean_token_accuracy"].append(
                (log_probs.argmax(-1) == inputs["chosen_token_ids"]).float().mean().item()
            )
            return (loss, None) if return_outputs else loss

    return LetterDPOTrainer


# ---------------------------------------------------------------- training


def held_out_metrics(model: Any, tokenizer: Any, spec: PromptSpec, held_out: dict[str, list[MCQuestion]]) -> dict:
    """Return accuracy / confidence / ECE on the held-out training-domain rows."""
    was_training = model.training
    model.eval()
    metrics = {}
    for name, rows in held_out.items():
        if rows:
            metrics[name] = summarize(option_probabilities(model, tokenizer, spec, rows, batch_size=16), rows)
    if was_training:
        model.train()
    return metrics


def last_logged(trainer: Any, key: str) -> float | None:
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    return float(values[-1]) if values else None


def mean_logged(trainer: Any, key: str, last: int) -> float | None:
    values = [entry[key] for entry in trainer.state.log_history if key in entry]
    return float(np.mean(values[-last:])) if values else None


def run_sft(model: Any, tokenizer: Any, dataset: Any, args: argparse.Namespace, scratch: Path) -> tuple[Any, dict]:
    from peft import LoraConfig
    from trl import SFTConfig

    config = SFTConfig(
        output_dir=str(scratch / "sft"),
        max_steps=args.sft_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.sft_lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.sft_steps // 20),
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        gradient_checkpointing=False,
        bf16=False,  # TRL configs default to bf16, which needs a GPU, and this script trains in float32
        use_cpu=not torch.cuda.is_available(),
        max_length=args.max_prompt_tokens + 1,
        dataset_kwargs={"skip_prepare_dataset": True},  # sft_dataset() already tokenized the rows
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    trainer = letter_sft_trainer_class()(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        data_collator=LastTokenCollator(tokenizer.pad_token_id),
    )
    started = time.time()
    result = trainer.train()
    seconds = time.time() - started
    stats = {
        "wall_time_s": round(seconds, 1),
        "steps": trainer.state.global_step,
        "mean_train_loss": result.training_loss,
        "final_loss": last_logged(trainer, "loss"),
        "mean_loss_last_5_logs": mean_logged(trainer, "loss", 5),
    }
    log.info("SFT done: %s", stats)
    return trainer.model, stats


def run_dpo(model: Any, tokenizer: Any, dataset: Any, args: argparse.Namespace, scratch: Path) -> tuple[Any, dict]:
    from trl import DPOConfig

    config = DPOConfig(
        output_dir=str(scratch / "dpo"),
        max_steps=args.dpo_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.dpo_lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.dpo_steps // 20),
        weight_decay=0.0,
        beta=args.beta,
        loss_type=["sigmoid"],
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        gradient_checkpointing=False,
        bf16=False,  # TRL configs default to bf16, which needs a GPU, and this script trains in float32
        use_cpu=not torch.cuda.is_available(),
        max_length=args.max_prompt_tokens + 1,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = letter_dpo_trainer_class()(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=LastTokenCollator(tokenizer.pad_token_id),
    )
    started = time.time()
    result = trainer.train()
    seconds = time.time() - started
    keys = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"]
    stats = {"wall_time_s": round(seconds, 1), "steps": trainer.state.global_step, "mean_train_loss": result.training_loss}
    for key in keys:
        stats[f"final_{key.replace('/', '_')}"] = last_logged(trainer, key)
    log.info("DPO done: %s", stats)
    return trainer.model, stats


# ---------------------------------------------------------------- output


def save_adapter(model: Any, output_dir: Path, dtype: torch.dtype, base_model_name: str) -> int:
    """Save only the trained "default" adapter with its weights cast to ``dtype``, and return the file size in bytes."""
    from safetensors.torch import load_file, save_file

    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("adapter_model.safetensors", "adapter_config.json"):
        (output_dir / stale).unlink(missing_ok=True)
    model.save_pretrained(output_dir, selected_adapters=["default"])
    weights_path = output_dir / "adapter_model.safetensors"
    weights = {name: tensor.to(dtype).contiguous() for name, tensor in load_file(weights_path).items()}
    save_file(weights, weights_path, metadata={"format": "pt"})

    # The base is a local conversion (plmcal.assets.converted_model_dir), so the absolute cache path
    # that PEFT records would not exist on another machine. Record the embedded model name.
    config_path = output_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_model_name
    config_path.write_text(json.dumps(adapter_config, indent=2) + "\n")
    (output_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    return weights_path.stat().st_size


def library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import peft
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
    }


def recipe_of(args: argparse.Namespace) -> dict[str, Any]:
    keys = [
        "seed", "batch_size", "max_prompt_tokens", "holdout_per_source", "lora_r", "lora_alpha", "lora_dropout",
        "sft_steps", "sft_lr", "sft_rows_per_source", "dpo_steps", "dpo_lr", "beta", "dpo_pairs_per_source",
    ]
    recipe = {key: getattr(args, key) for key in keys}
    recipe["lora_targets"] = LORA_TARGETS
    recipe["lr_scheduler"] = "cosine, 5% warmup"
    recipe["dpo_loss"] = "sigmoid"
    return recipe


def previous_attempts(output_dir: Path, recipe_id: str) -> list[dict]:
    """Return the attempts recorded in an existing training.json, minus any with this recipe."""
    path = output_dir / "training.json"
    if not path.exists():
        return []
    attempts = json.loads(path.read_text()).get("attempts", [])
    return [attempt for attempt in attempts if attempt.get("recipe_id") != recipe_id]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help="adapter folder (default: %(default)s)")
    parser.add_argument("--model", default="gemma-3-270m", help="embedded base model name (default: %(default)s)")
    parser.add_argument("--prompt", type=Path, default=DEFAULT_PROMPT, help="prompt config YAML (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data split, LoRA init and trainers (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step, both stages (default: %(default)s)")
    parser.add_argument("--max-prompt-tokens", type=int, default=128, help="drop questions whose prompt has more tokens (default: %(default)s)")
    parser.add_argument("--holdout-per-source", type=int, default=60, help="rows per source kept out of training for the sanity check (default: %(default)s)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default: %(default)s)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: %(default)s)")
    parser.add_argument("--sft-steps", type=int, default=60, help="SFT optimizer steps (default: %(default)s)")
    parser.add_argument("--sft-lr", type=float, default=2e-4, help="SFT peak learning rate (default: %(default)s)")
    parser.add_argument("--dpo-steps", type=int, default=80, help="DPO optimizer steps (default: %(default)s)")
    parser.add_argument("--dpo-lr", type=float, default=5e-4, help="DPO peak learning rate (default: %(default)s)")
    parser.add_argument("--beta", type=float, default=0.05, help="DPO beta (default: %(default)s)")
    parser.add_argument(
        "--sft-rows-per-source", type=int, default=None,
        help="SFT rows drawn from each source; 0 or unset draws one epoch's worth of --sft-steps (default: one epoch)",
    )
    parser.add_argument(
        "--dpo-pairs-per-source", type=int, default=64,
        help="DPO pairs drawn from each source; 0 draws one epoch's worth of --dpo-steps (default: %(default)s, "
        "so 80 steps of 8 loop about 3.3 times over 192 pairs)",
    )
    parser.add_argument(
        "--save-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
        help="dtype of the saved LoRA weights (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--note", default="", help="free text stored with this attempt in training.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    set_seed(args.seed)
    total_started = time.time()
    model_dir = assets.converted_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = PromptSpec.from_config(OmegaConf.load(args.prompt))
    sft_rows, dpo_rows, held_out, sizes = split_sources(tokenizer, spec, args)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_held_out = held_out_metrics(model, tokenizer, spec, held_out)
    log.info("held-out, base: %s", base_held_out)

    scratch = args.output_dir / "_trainer_scratch"
    sft_data = sft_dataset(tokenizer, spec, [row for rows in sft_rows.values() for row in rows], args.seed)
    model, sft_stats = run_sft(model, tokenizer, sft_data, args, scratch)
    sft_held_out = held_out_metrics(model, tokenizer, spec, held_out)
    log.info("held-out, after SFT: %s", sft_held_out)

    dpo_data = dpo_dataset(tokenizer, spec, [row for rows in dpo_rows.values() for row in rows], args.seed)
    model, dpo_stats = run_dpo(model, tokenizer, dpo_data, args, scratch)
    model.set_adapter("default")
    dpo_held_out = held_out_metrics(model, tokenizer, spec, held_out)
    log.info("held-out, after DPO: %s", dpo_held_out)

    adapter_bytes = save_adapter(model, args.output_dir, getattr(torch, args.save_dtype), args.model)
    shutil.rmtree(scratch, ignore_errors=True)

    recipe = recipe_of(args)
    recipe_id = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    attempt = {
        "recipe_id": recipe_id,
        "note": args.note,
        "recipe": recipe,
        "sft": sft_stats,
        "dpo": dpo_stats,
        "held_out": {"base": base_held_out, "after_sft": sft_held_out, "after_dpo": dpo_held_out},
        "evaluation": None,  # filled in by eval_overconfidence.py
    }
    record = {
        "recipe_id": recipe_id,
        "base_model": args.model,
        "base_model_source": json.loads((model_dir / "source.json").read_text()),
        "prompt": {"name": spec.name, "version": spec.version, "digest": spec.digest()},
        "command": shlex.join(["python", "experiments/post_train.py", *(argv if argv is not None else sys.argv[1:])]),
        "recipe": recipe,
        "data_sizes": sizes,
        "stages": {"sft": sft_stats, "dpo": dpo_stats},
        "held_out": attempt["held_out"],
        "adapter_weights_dtype": args.save_dtype,
        "adapter_weights_bytes": adapter_bytes,
        "total_wall_time_s": round(time.time() - total_started, 1),
        "versions": library_versions(),
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        "attempts": previous_attempts(args.output_dir, recipe_id) + [attempt],
    }
    (args.output_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    log.info("wrote the adapter (%d bytes) and training.json to %s", adapter_bytes, args.output_dir)


if __name__ == "__main__":
    main()
