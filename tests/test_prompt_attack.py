"""The prompt-space attack (hard prompts, PEZ-style) and the attack's budget snapshots, on a tiny
random SD1.x-shaped bundle: the output is a string of whole-word vocabulary tokens whose encoding
is the returned embedding, the best string tried is kept, and a snapshot after b steps is exactly
the b-step attack (what the robustness curve relies on)."""

from __future__ import annotations

import pytest
import torch

from factories import target_latents, word_bundle
from memtrain.attack import AttackConfig, DoriAttack, PromptAttack, word_token_ids
from memtrain.core.text import encode_prompts
from memtrain.mitigations import get_mitigation

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.set_num_threads(1)
    return word_bundle(tmp_path_factory.mktemp("tok"))


def latents(bundle, n=2):
    return target_latents(bundle, n)


@pytest.mark.parametrize("init", ["prompt", "random"])
def test_hard_prompts_are_vocabulary_words_whose_encoding_is_returned(bundle, init):
    config = AttackConfig(steps=4, noise_samples=2, init=init, lr=0.1)
    attack = PromptAttack(bundle, latents(bundle), PROMPTS, config)
    start = attack.token_ids().clone()
    result = attack.run()
    assert len(result.prompts) == 2 and all(isinstance(p, str) and p for p in result.prompts)
    words = set(bundle.tokenizer.convert_ids_to_tokens(word_token_ids(bundle.tokenizer).tolist()))
    for row in attack.token_ids()[:, 1 : 1 + attack.length]:
        assert set(bundle.tokenizer.convert_ids_to_tokens(row.tolist())) <= words
    if init == "prompt":
        assert start[0, 1:6].tolist() == bundle.tokenizer(PROMPTS[0]).input_ids[1:6]  # starts at the prompt
    # the strings re-encode to the embedding the attack returns (whole words round-trip)
    assert torch.allclose(encode_prompts(bundle, result.prompts).embeddings, result.embeddings, atol=1e-5)
    # the kept string is the one with the lowest loss among those tried
    assert torch.equal(attack.best_loss, torch.nan_to_num(result.loss_trace, nan=float("inf")).min(dim=0).values)


def test_prompt_attack_moves_through_the_mitigations_text_path(bundle):
    """Straight-through gradients reach the continuous tokens, through pad_eot's transform."""
    attack = PromptAttack(bundle, latents(bundle), PROMPTS, AttackConfig(steps=1, noise_samples=2),
                          mitigation=get_mitigation("pad_eot"))
    before = attack.y.detach().clone()
    attack.run()
    assert not torch.equal(before, attack.y.detach())
    assert (attack.template[:, attack.length + 2:] == attack.tokenizer.pad_token_id).all()  # '!' padding


@pytest.mark.parametrize("cls", [DoriAttack, PromptAttack])
def test_budget_snapshots_equal_shorter_attacks(bundle, cls):
    config = AttackConfig(steps=4, noise_samples=2, init="random", lr=0.05)
    full = cls(bundle, latents(bundle), PROMPTS, config).run(budgets=[2, 9])
    assert sorted(full.snapshots) == [2]  # budgets at or above the full attack are the attack itself
    short = cls(bundle, latents(bundle), PROMPTS, AttackConfig(**{**config.__dict__, "steps": 2})).run()
    assert torch.equal(full.snapshots[2].embeddings, short.embeddings)
    assert full.snapshots[2].prompts == short.prompts
