"""Render multiple-choice questions into prompts, from a versioned prompt config.

The config's ``version`` enters the read-out cache key: bump it whenever the rendered text changes.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Sequence

from plmcal.data import MCQuestion

LETTERS = "ABCDEFGHIJ"  # DACA prompts have A-D; more options continue the same layout up to J


class PromptError(ValueError):
    """A prompt setting is invalid."""


@dataclass(frozen=True)
class PromptSpec:
    """The text pieces and switches that turn a question into a prompt."""

    name: str
    version: int
    instruction: str
    question_template: str
    option_template: str
    answer_prefix: str
    letters: str = LETTERS
    option_token: str = "{letter}"  # the text whose single token is read out for each letter
    chat_template: bool = False
    fewshot_k: int = 0
    fewshot_seed: int = 0
    fewshot_separator: str = "\n\n"

    @classmethod
    def from_config(cls, cfg: Any) -> "PromptSpec":
        fewshot = cfg.get("fewshot") or {}
        spec = cls(
            name=str(cfg.name),
            version=int(cfg.version),
            instruction=str(cfg.instruction),
            question_template=str(cfg.question_template),
            option_template=str(cfg.option_template),
            answer_prefix=str(cfg.answer_prefix),
            letters=str(cfg.get("letters", LETTERS)),
            option_token=str(cfg.get("option_token", "{letter}")),
            chat_template=bool(cfg.get("chat_template", False)),
            fewshot_k=int(fewshot.get("k", 0)),
            fewshot_seed=int(fewshot.get("seed", 0)),
        )
        if spec.fewshot_k < 0:
            raise PromptError(f"prompt.fewshot.k={spec.fewshot_k} is invalid; use 0 or a positive count.")
        if "{question}" not in spec.question_template:
            raise PromptError(f"prompt.question_template {spec.question_template!r} lacks the {{question}} field.")
        for key in ("{letter}", "{option}"):
            if key not in spec.option_template:
                raise PromptError(f"prompt.option_template {spec.option_template!r} lacks the {key} field.")
        if len(set(spec.letters)) != len(spec.letters):
            raise PromptError(f"prompt.letters={spec.letters!r} repeats a letter.")
        return spec

    def digest(self) -> str:
        """Return a short hash of every field, so an edited template never reuses a stale cache."""
        payload = json.dumps(self.__dict__, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def option_strings(self, n_options: int) -> list[str]:
        if n_options > len(self.letters):
            raise PromptError(
                f"the dataset has questions with {n_options} options but prompt.letters={self.letters!r} has only "
                f"{len(self.letters)} letters; give at least {n_options} letters (default ABCDEFGHIJ)."
            )
        return [self.option_token.format(letter=letter) for letter in self.letters[:n_options]]

    def render_block(self, question: MCQuestion) -> str:
        text = self.question_template.format(question=question.question.strip())
        for letter, option in zip(self.letters, question.options):
            text += self.option_template.format(letter=letter, option=str(option).strip())
        return text + self.answer_prefix

    def render(self, question: MCQuestion, exemplars: Sequence[MCQuestion] = ()) -> str:
        """Render the user-side text: instruction, optional solved exemplars, then the question."""
        parts = [self.instruction]
        for example in exemplars:
            parts.append(self.render_block(example) + self.letters[example.gold] + self.fewshot_separator)
        parts.append(self.render_block(question))
        return "".join(parts)


def split_fewshot(rows: list[MCQuestion], spec: PromptSpec) -> tuple[list[MCQuestion], list[MCQuestion]]:
    """Draw ``fewshot_k`` exemplars (seeded) and return (exemplars, remaining rows to evaluate).

    Exemplars are removed from the evaluated rows so no question is scored with its own answer in
    the prompt.
    """
    if spec.fewshot_k == 0:
        return [], rows
    if spec.fewshot_k >= len(rows):
        raise PromptError(f"prompt.fewshot.k={spec.fewshot_k} leaves no question to evaluate out of {len(rows)}.")
    rng = random.Random(spec.fewshot_seed)
    chosen = set(rng.sample(range(len(rows)), spec.fewshot_k))
    exemplars = [rows[i] for i in sorted(chosen)]
    remaining = [row for i, row in enumerate(rows) if i not in chosen]
    return exemplars, remaining


def build_prompts(tokenizer: Any, rows: Sequence[MCQuestion], spec: PromptSpec, exemplars: Sequence[MCQuestion] = ()) -> list[str]:
    """Render every row; with ``chat_template`` the text becomes one user turn plus the generation prompt."""
    texts = [spec.render(row, exemplars) for row in rows]
    if not spec.chat_template:
        return texts
    if getattr(tokenizer, "chat_template", None) is None:
        raise PromptError(
            f"prompt.chat_template=true but tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat "
            "template; set prompt.chat_template=false for base models."
        )
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        for text in texts
    ]
