"""Prompt-string mitigations of Somepalli et al. 2023: random tokens (RTA) or random numbers (RNA)
inserted into the prompt before it is tokenized.

The insertion is seeded by (seed, prompt), so a prompt is rewritten the same way whatever batch
it is in and on every process. The random tokens are whole words of the tokenizer's own
vocabulary (entries ending in the BPE end-of-word marker, letters only), so each one is a real
token of the model. An attacker who feeds text embeddings never passes through these (they only
see strings): they are audited under the `prompt` and `weights` threat models.
"""

from __future__ import annotations

import dataclasses
import functools
import random

from memtrain.core.errors import MemtrainError
from memtrain.core.tokenizer import whole_word_vocabulary
from memtrain.mitigations.base import Mitigation, register_mitigation

POSITIONS = ("random", "start", "end")


@dataclasses.dataclass(eq=False)
class _RandomInsertion(Mitigation):
    """Insert `count` random words at `position` ("random": anywhere between the prompt's words)."""

    inference_time = True
    sees_embeddings = False

    count: int = 4
    position: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.count) < 1:
            raise MemtrainError(f"{self.name}: count must be >= 1, got {self.count}")
        if self.position not in POSITIONS:
            raise MemtrainError(f"{self.name}: position '{self.position}' is not one of {', '.join(POSITIONS)}")

    def draw(self, rng: random.Random, tokenizer) -> str:
        raise NotImplementedError  # the abstract hook: one random word

    def insert(self, prompt: str, tokenizer) -> str:
        """The prompt with `count` random words inserted (deterministic per seed and prompt)."""
        rng = random.Random(f"{self.seed}:{prompt}")
        words = prompt.split()
        for _ in range(int(self.count)):
            where = {"start": 0, "end": len(words)}.get(self.position)
            if where is None:
                where = rng.randint(0, len(words))
            words.insert(where, self.draw(rng, tokenizer))
        return " ".join(words)

    def transform_prompts(self, prompts: list[str], tokenizer) -> list[str]:
        return [self.insert(p, tokenizer) for p in prompts]


@functools.lru_cache(maxsize=4)
def vocabulary_words(tokenizer) -> tuple[str, ...]:
    """Whole-word, letters-only ASCII entries of a CLIP BPE tokenizer's vocabulary, sorted."""
    words = tuple(whole_word_vocabulary(tokenizer, letters_only=True))
    if not words:
        raise MemtrainError("rta: the tokenizer's vocabulary has no whole-word entries to insert")
    return words


@register_mitigation
@dataclasses.dataclass(eq=False)
class RandomTokenAddition(_RandomInsertion):
    """RTA: random vocabulary words inserted into the prompt."""

    name = "rta"
    changes = "prompt string: `count` random vocabulary words inserted (seeded per prompt)"

    def draw(self, rng: random.Random, tokenizer) -> str:
        return rng.choice(vocabulary_words(tokenizer))


@register_mitigation
@dataclasses.dataclass(eq=False)
class RandomNumberAddition(_RandomInsertion):
    """RNA: random integers (0 .. 10^6 - 1) inserted into the prompt."""

    name = "rna"
    changes = "prompt string: `count` random numbers inserted (seeded per prompt)"

    def draw(self, rng: random.Random, tokenizer) -> str:
        return str(rng.randrange(10 ** 6))
