"""Prompt-string mitigations of Somepalli et al. 2023 ("Understanding and Mitigating Copying in
Diffusion Models"): random tokens (RTA) or random numbers (RNA) inserted into the prompt before it
is tokenized. An attacker who feeds text embeddings never passes through these (they only see
strings): they are audited under the `prompt` and `weights` threat models.

Two draws, chosen by the `vocabulary` setting (docs/fidelity.md, "RTA / RNA"):

* "official" (default), as the authors' code draws: an RTA word is the tokenizer's decoding of
  one token id drawn uniformly from 0..49399 (the last 8 ids of CLIP's 49,408 never come up), so
  about 13% of the words re-tokenize into several tokens and some are not whole words; an RNA
  number is drawn uniformly from 0..99,999. Each of the `count` words goes into a uniformly drawn
  slot of `prompt.split(" ")` (0..len(words)).
* "whole_words" (memtrain's earlier draw): RTA words are whole-word, letters-only entries of the
  tokenizer's vocabulary (each one real token of the model), RNA numbers 0..999,999, slots among
  `prompt.split()`.

Either way the draw is seeded by (seed, prompt), so a prompt is rewritten the same way whatever
batch it is in and on every process (the authors' code is unseeded).
"""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import Callable

from memtrain.core.errors import MemtrainError
from memtrain.core.tokenizer import whole_word_vocabulary
from memtrain.mitigations.base import Mitigation, register_mitigation

POSITIONS = ("random", "start", "end")
VOCABULARIES = ("official", "whole_words")
# The authors' draw range: CLIP's vocabulary less its last merges and the two special tokens.
OFFICIAL_TOKEN_IDS = 49400
OFFICIAL_NUMBERS = 100_000
WHOLE_WORD_NUMBERS = 10 ** 6


def official_word(tokenizer, token_id: int) -> str:
    """The RTA word of the official draw for one token id: the tokenizer's decoding of it."""
    return tokenizer.decode([int(token_id)])


def official_token_ids(tokenizer) -> int:
    """How many token ids the official draw chooses from (0..n-1): 49,400, or fewer on a smaller
    vocabulary (test tokenizers), so that every drawn id exists."""
    return min(OFFICIAL_TOKEN_IDS, len(tokenizer))


def insert_words(prompt: str, count: int, draw: Callable[[], str], slot: Callable[[int], int],
                 separator: str | None = " ") -> str:
    """`prompt` with `count` words inserted, each drawn by `draw()` and put at index
    `slot(len(words))` of the prompt's words (split on `separator`; None: any whitespace),
    joined by single spaces. Word first, then its slot, as the official insertion does."""
    words = prompt.split(separator)
    for _ in range(int(count)):
        word = draw()
        words.insert(slot(len(words)), word)
    return " ".join(words)


@dataclasses.dataclass(eq=False)
class _RandomInsertion(Mitigation):
    """Insert `count` random words at `position` ("random": anywhere between the prompt's words)."""

    inference_time = True
    sees_embeddings = False

    count: int = 4  # the authors' command-line default (rand_aug_repeats)
    position: str = "random"
    seed: int = 0
    vocabulary: str = "official"  # "official" (the authors' draw) | "whole_words" (memtrain's earlier one)

    def __post_init__(self) -> None:
        if int(self.count) < 1:
            raise MemtrainError(f"{self.name}: count must be >= 1, got {self.count}")
        if self.position not in POSITIONS:
            raise MemtrainError(f"{self.name}: position '{self.position}' is not one of {', '.join(POSITIONS)}")
        if self.vocabulary not in VOCABULARIES:
            raise MemtrainError(f"{self.name}: vocabulary '{self.vocabulary}' is not one of {', '.join(VOCABULARIES)}")

    @property
    def variant(self) -> str:  # type: ignore[override]
        """"official (DCR)" or "whole_words": which draw rewrites the prompts."""
        return "official (DCR)" if self.vocabulary == "official" else "whole_words"

    def draw(self, rng: random.Random, tokenizer) -> str:
        raise NotImplementedError  # the abstract hook: one random word

    def insert(self, prompt: str, tokenizer, rng: random.Random | None = None) -> str:
        """The prompt with `count` random words inserted, deterministic per seed and prompt.
        `rng` (anything with `randrange` and `randint`) replaces that seeding, e.g. to replay
        another program's random streams through this same insertion."""
        rng = random.Random(f"{self.seed}:{prompt}") if rng is None else rng

        def slot(n_words: int) -> int:
            if self.position == "start":
                return 0
            return n_words if self.position == "end" else rng.randint(0, n_words)

        if self.vocabulary == "official":
            return insert_words(prompt, self.count, lambda: self.draw(rng, tokenizer), slot)
        # memtrain's earlier order (slot, then word) keeps its rewrites as they were
        words = prompt.split()
        for _ in range(int(self.count)):
            where = slot(len(words))
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
    """RTA: random tokenizer words inserted into the prompt."""

    name = "rta"
    changes = "prompt string: `count` random vocabulary words inserted (seeded per prompt)"

    def draw(self, rng: random.Random, tokenizer) -> str:
        """One word: a decoded uniform token id ("official") or a whole vocabulary word."""
        if self.vocabulary == "official":
            return official_word(tokenizer, rng.randrange(official_token_ids(tokenizer)))
        return rng.choice(vocabulary_words(tokenizer))


@register_mitigation
@dataclasses.dataclass(eq=False)
class RandomNumberAddition(_RandomInsertion):
    """RNA: random integers inserted into the prompt (0..99,999 official, 0..999,999 whole_words)."""

    name = "rna"
    changes = "prompt string: `count` random numbers inserted (seeded per prompt)"

    def draw(self, rng: random.Random, tokenizer) -> str:
        """One number as a string."""
        return str(rng.randrange(OFFICIAL_NUMBERS if self.vocabulary == "official" else WHOLE_WORD_NUMBERS))
