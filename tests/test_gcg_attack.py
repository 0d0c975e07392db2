"""The GCG prompt attack (UnlearnDiffAtk's objective, GCG's token swaps) on a tiny random SD1.x-shaped
bundle: it lowers the diffusion loss of its start prompt, its strings re-tokenize to the tokens it
optimized, the same seed gives the same prompts, and bad settings are refused in one line."""

from __future__ import annotations

import pytest
import torch

from factories import target_latents, word_bundle
from memtrain.attack import AttackConfig, GCGAttack, GCGSettings, diffusion_loss, word_token_ids
from memtrain.core.errors import MemtrainError
from memtrain.core.text import encode_prompts
from memtrain.mitigations import get_mitigation

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse"]
SMALL = GCGSettings(top_k=16, candidates=24)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.set_num_threads(1)
    return word_bundle(tmp_path_factory.mktemp("tok"))


def latents(bundle, n=2):
    return target_latents(bundle, n)


def fixed_draws(bundle, n=2, k=16):
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(n, k, bundle.latent_channels, bundle.sample_size, bundle.sample_size, generator=g)
    return noise, torch.randint(0, 1000, (n, k), generator=g)


def test_gcg_lowers_the_diffusion_loss_of_its_start_prompt(bundle):
    x = latents(bundle)
    attack = GCGAttack(bundle, x, PROMPTS, AttackConfig(steps=8, noise_samples=4, init="random"), gcg=SMALL)
    start = attack.token_ids().clone()
    result = attack.run()
    noise, times = fixed_draws(bundle)
    with torch.no_grad():
        before = bundle.text_encoder(start).last_hidden_state
    loss_before = diffusion_loss(bundle, x, before, noise, times)
    loss_after = diffusion_loss(bundle, x, encode_prompts(bundle, result.prompts).embeddings, noise, times)
    assert (loss_after < loss_before).all(), (loss_before, loss_after)
    assert not torch.equal(attack.token_ids(), start)  # it swapped tokens


@pytest.mark.parametrize("init", ["prompt", "random"])
def test_gcg_strings_retokenize_to_the_optimized_tokens(bundle, init):
    attack = GCGAttack(bundle, latents(bundle), PROMPTS, AttackConfig(steps=3, noise_samples=2, init=init), gcg=SMALL)
    result = attack.run()
    ids = attack.token_ids()[:, 1 : 1 + attack.length]
    words = set(word_token_ids(bundle.tokenizer).tolist())
    assert set(ids.flatten().tolist()) <= words
    for prompt, row in zip(result.prompts, ids):
        assert bundle.tokenizer(prompt).input_ids[1:-1] == row.tolist()
    assert torch.allclose(encode_prompts(bundle, result.prompts).embeddings, result.embeddings, atol=1e-5)
    # the state stays one-hot: exactly one 1 per position
    assert torch.equal(attack.y.detach().sum(dim=-1), torch.ones(2, attack.length))
    assert torch.equal(attack.best_loss, torch.nan_to_num(result.loss_trace, nan=float("inf")).min(dim=0).values)


def test_gcg_same_seed_same_prompts_and_targets_keep_their_streams(bundle):
    config = AttackConfig(steps=3, noise_samples=2, init="random", seed=5)
    first = GCGAttack(bundle, latents(bundle), PROMPTS, config, gcg=SMALL).run()
    again = GCGAttack(bundle, latents(bundle), PROMPTS, config, gcg=SMALL).run()
    assert first.prompts == again.prompts and torch.equal(first.loss_trace, again.loss_trace)
    alone = GCGAttack(bundle, latents(bundle)[1:], PROMPTS[1:], config, gcg=SMALL, indices=[1]).run()
    assert alone.prompts == first.prompts[1:]
    other = GCGAttack(bundle, latents(bundle), PROMPTS, AttackConfig(**{**config.__dict__, "seed": 6}), gcg=SMALL).run()
    assert other.prompts != first.prompts


def test_gcg_runs_through_a_mitigations_text_path(bundle):
    attack = GCGAttack(bundle, latents(bundle), PROMPTS, AttackConfig(steps=2, noise_samples=2, init="random"),
                       mitigation=get_mitigation("pad_eot"), gcg=SMALL)
    result = attack.run()
    assert torch.isfinite(result.loss_trace).all() and len(result.prompts) == 2


@pytest.mark.parametrize("key", ["top_k", "candidates"])
def test_gcg_settings_refuse_nonpositive_values(key):
    with pytest.raises(MemtrainError, match=f"gcg {key} must be >= 1") as err:
        GCGSettings(**{key: 0})
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- in the audit

from test_audit import _audit, _config, tiny_testbed  # noqa: E402,F401  (the tiny testbed fixture)
from report_schema import assert_documented  # noqa: E402


def test_audit_runs_gcg_under_the_prompt_threat_model_and_names_every_attack(tiny_testbed, tmp_path):
    import json

    out = tmp_path / "audit"
    doc = _audit(_config(tiny_testbed, out, ["none"], max_targets=2, threat_models=["embedding", "prompt"],
                         prompt_attack="gcg", gcg={"top_k": 8, "candidates": 6}))
    rows = {r["threat_model"]: r for r in doc["results"]}
    assert (rows["prompt"]["attack_name"], rows["embedding"]["attack_name"]) == ("gcg", "dori")
    assert doc["settings"]["recipe"]["prompt_attack"] == "gcg"
    assert doc["settings"]["recipe"]["gcg"] == {"top_k": 8, "candidates": 6}
    found = [it["found_prompt"] for it in rows["prompt"]["per_item"]]
    assert len(found) == 2 and all(isinstance(p, str) and p for p in found)
    text = (out / "report.md").read_text()
    assert "gcg: standard: all timesteps" in text and "dori: standard: all timesteps" in text
    assert "Attack: gcg hard prompts" in text
    assert_documented("report.json (scripts/audit.py)", json.loads((out / "report.json").read_text()))


def test_audit_refuses_an_unknown_prompt_attack_in_one_line(tiny_testbed, tmp_path):
    with pytest.raises(MemtrainError) as err:
        _config(tiny_testbed, tmp_path / "out", ["none"], prompt_attack="autodan")
    assert str(err.value) == "recipe key 'prompt_attack': unknown attack 'autodan': choose one of pez, gcg"
