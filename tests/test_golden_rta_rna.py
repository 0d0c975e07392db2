"""RTA/RNA (Somepalli et al. 2023) against the numbers of the authors' own draw (source:
tests/golden/official.json, `rta_rna`, produced by running somepago/DCR at the commit under
`meta.official_code.dcr` on the golden fixture's tokenizer; docs/fidelity.md, "RTA / RNA").

The enumeration facts depend only on the tokenizer, so they are exact: every token id / number
the official draw can produce is pushed through memtrain's own draw (`draw` with a stand-in
generator that returns that id), then re-tokenized. The Monte-Carlo facts replay the official
run's random streams (numpy's legacy RandomState seeded 0 for the word or number, Python's
`random` seeded 0 for the slot) through memtrain's insertion, so they are exact too."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from golden_fixture import OFFICIAL, PROMPTS
from memtrain.mitigations import get_mitigation
from memtrain.mitigations.random_insertion import official_token_ids

GOLD = OFFICIAL["rta_rna"]


class _Fixed:
    """A generator stand-in whose randrange(n) returns a given value (and records n)."""

    def __init__(self, value: int):
        self.value, self.ranges = value, []

    def randrange(self, n: int) -> int:
        self.ranges.append(n)
        return self.value


def _drawn(name: str, tokenizer, n: int) -> list[str]:
    """Every word memtrain's official draw can produce, by the value its generator returns."""
    m = get_mitigation(name)
    words = []
    for k in range(n):
        rng = _Fixed(k)
        words.append(m.draw(rng, tokenizer))
        assert rng.ranges == [n]  # the draw asks for exactly the official range
    return words


def _token_counts(tokenizer, words: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(words, add_special_tokens=False).input_ids]


@pytest.fixture(scope="module")
def rta_words(golden):
    gold = GOLD["rta"]
    assert official_token_ids(golden.tokenizer) == gold["draw_space_size"] == 49400
    return _drawn("rta", golden.tokenizer, gold["draw_space_size"])


def test_rta_enumeration_matches_the_official_draw(golden, rta_words):
    gold, tok = GOLD["rta"], golden.tokenizer
    n = len(rta_words)
    counts = _token_counts(tok, rta_words)
    hist = Counter(counts)
    assert {str(k): v for k, v in sorted(hist.items())} == gold["token_count_histogram"]
    assert sum(c > 1 for c in counts) / n == gold["fraction_retokenize_gt1"]
    assert sum(c == 1 for c in counts) / n == gold["fraction_retokenize_eq1"]
    assert sum(c == 0 for c in counts) / n == gold["fraction_retokenize_eq0"]
    assert max(counts) == gold["max_tokens_per_inserted_word"]
    assert sum(counts) / n == pytest.approx(gold["mean_tokens_per_inserted_word"], rel=1e-12)
    same = tok(rta_words, add_special_tokens=False).input_ids
    assert sum(ids == [k] for k, ids in enumerate(same)) / n == gold["fraction_retokenize_to_same_single_id"]
    tokens = tok.convert_ids_to_tokens(list(range(n)))
    assert sum(t.endswith("</w>") for t in tokens) / n == gold["fraction_whole_word_ids"]
    assert sum(not w.isascii() for w in rta_words) / n == gold["fraction_decoded_nonascii"]
    assert sum("\ufffd" in w for w in rta_words) / n == gold["fraction_decoded_with_replacement_char"]
    assert {k: rta_words[int(k)] for k in gold["decode_examples"]} == gold["decode_examples"]


def test_rna_enumeration_matches_the_official_draw(golden):
    gold, tok = GOLD["rna"], golden.tokenizer
    n = gold["number_range"][1] + 1
    numbers = _drawn("rna", tok, n)
    assert numbers[:3] == ["0", "1", "2"] and numbers[-1] == "99999"
    counts = _token_counts(tok, numbers)
    hist = Counter(counts)
    assert {str(k): hist.get(k, 0) for k in range(6)} == gold["token_count_histogram"]
    assert sum(c > 1 for c in counts) / n == gold["fraction_retokenize_gt1"]
    assert sum(counts) / n == pytest.approx(gold["mean_tokens_per_inserted_number"], rel=1e-12)


class _Legacy:
    """The official run's two streams: numpy's legacy global generator for the word or number
    (`np.random.randint(49400, size=1)`, `np.random.choice(100000)`) and Python's `random` for the
    slot, each seeded 0 as the golden numbers were."""

    def __init__(self, style: str):
        self.style, self.np, self.py = style, np.random.RandomState(0), random.Random(0)

    def randrange(self, n: int) -> int:
        if self.style == "rand_word_add":
            return int(self.np.randint(n, size=1)[0])
        return int(self.np.choice(n))

    def randint(self, a: int, b: int) -> int:
        return self.py.randint(a, b)


@pytest.mark.parametrize("key", sorted(GOLD["procedure_monte_carlo"]))
def test_monte_carlo_replays_the_official_streams(golden, key):
    gold, tok = GOLD["procedure_monte_carlo"][key], golden.tokenizer
    style, repeats = key.split(",repeat_num=")
    m = get_mitigation("rta" if style == "rand_word_add" else "rna", count=int(repeats))
    legacy = _Legacy(style)
    prompt = PROMPTS[0]
    assert (gold["np_seed"], gold["random_seed"]) == (0, 0)
    out = [m.insert(prompt, tok, rng=legacy) for _ in range(gold["samples"])]
    assert out[:3] == gold["first_3"]
    base = len(tok(prompt).input_ids)
    added = [len(ids) - base for ids in tok(out).input_ids]
    assert sum(added) / len(out) == pytest.approx(gold["mean_tokens_added"], rel=1e-12)
    assert sum(a > int(repeats) for a in added) / len(out) == gold["fraction_adding_more_tokens_than_words"]
    words = len(prompt.split(" "))
    assert sum(len(s.split(" ")) - words for s in out) / len(out) == gold["mean_words_added"]
