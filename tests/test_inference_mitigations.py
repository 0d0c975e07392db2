"""The sampler-side (paper 002, 003), attention (Ren), embedding-optimizing (Wen) and
prompt-string (Somepalli et al.) mitigations, each on a tiny random SD1.x-shaped bundle (fast
tier) and on the real memorizing testbed (slow tier): each changes only what it claims (guidance
scale per step, attention logits, the condition, or the prompt string), leaves weights and text
path alone, and without it sampling is bit-identical."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from factories import tiny_bundle
from memtrain.core.errors import MemtrainError
from memtrain.core.sampling import SamplerSettings, sample
from memtrain.core.text import encode_prompts
from memtrain.core.tokenizer import build_clip_tokenizer
from memtrain.mitigations import THREAT_MODELS, decomposition_delta, get_mitigation

PROMPT = ["a photo of a cat"]
SETTINGS = SamplerSettings(scheduler="ddim", guidance_scale=3.0, num_inference_steps=5)
SAMPLER_SIDE = ["guidance_static", "guidance_dynamic", "guidance_opposite", "overestimation_switch"]


@pytest.fixture(scope="module", params=["tiny", pytest.param("testbed", marks=[pytest.mark.slow, pytest.mark.testbed])])
def bundle(request, tmp_path_factory):
    if request.param == "testbed":
        from memtrain.core.bundle import load_bundle

        return load_bundle(request.getfixturevalue("testbed_dir") / "model")
    torch.set_num_threads(1)
    return tiny_bundle(None, tokenizer=build_clip_tokenizer(tmp_path_factory.mktemp("tok")))


def recorded(bundle, mitigation):
    """Images with the mitigated sampler, and the (t, scale) the hook chose at each step."""
    kwargs = mitigation.sampling_kwargs(bundle, SETTINGS)
    seen, hook = [], kwargs["hook"]

    def spy(step, t, x, eps_c, eps_u):
        scale = hook(step, t, x, eps_c, eps_u)
        seen.append((t, scale))
        return scale

    kwargs["hook"] = spy if hook is not None else None
    return sample(bundle, mitigation.encode(bundle, PROMPT), [0, 1], SETTINGS, **kwargs).images, seen


def test_no_mitigation_keeps_sampling_bit_identical(bundle):
    none = get_mitigation("none")
    plain = sample(bundle, PROMPT, [0, 1], SETTINGS).images
    assert torch.equal(plain, sample(bundle, none.encode(bundle, PROMPT), [0, 1], SETTINGS,
                                     **none.sampling_kwargs(bundle, SETTINGS)).images)


@pytest.mark.parametrize("name", SAMPLER_SIDE)
def test_sampler_side_changes_only_the_guidance(bundle, name):
    m = get_mitigation(name)
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    assert torch.equal(m.encode(bundle, PROMPT).embeddings, encode_prompts(bundle, PROMPT).embeddings)
    assert m.inference_time and m.bypassed_by("weights") and m.threat_model_reason("embedding") is None
    images, seen = recorded(bundle, m)
    assert all(torch.equal(v, bundle.unet.state_dict()[k]) for k, v in before.items())
    assert len(seen) == SETTINGS.num_inference_steps
    plain = sample(bundle, PROMPT, [0, 1], SETTINGS).images
    changed = any(s is not None and not torch.all(torch.as_tensor(s) == SETTINGS.guidance_scale) for _, s in seen)
    assert changed and not torch.equal(images, plain)  # it changed the scale somewhere, and that is visible
    # a hook that keeps the sampler's scale everywhere reproduces the plain images exactly
    keep = sample(bundle, PROMPT, [0, 1], SETTINGS, hook=lambda *a: None).images
    assert torch.equal(keep, plain)


def test_static_switches_at_the_transition_timestep(bundle):
    _, seen = recorded(bundle, get_mitigation("guidance_static", transition_t=500))
    assert [s for t, s in seen] == [0.0 if t > 500 else None for t, _ in seen]
    assert get_mitigation("guidance_static").text_timesteps(1000) == (0, 501)
    assert get_mitigation("guidance_static", transition_fraction=0.3).transition(1000) == 300
    with pytest.raises(MemtrainError, match="transition_fraction"):
        get_mitigation("guidance_static", transition_fraction=1.5)


@pytest.mark.parametrize("name, settings, before", [("guidance_dynamic", {}, 0.0), ("guidance_opposite", {}, -3.0),
                                                     ("guidance_dynamic", {"pre_switch_scale": 1.0}, 1.0)])
def test_dynamic_switches_after_the_first_local_minimum(bundle, name, settings, before):
    """Alg. 1 of paper 003 on a synthetic d_t sequence 9, 4, 1, 2, 5, 0.5: the first local minimum
    is d=1 (step 2), seen at step 3, so steps 0-2 use `before` and steps 3.. the full scale
    (pre_switch_scale 1.0: the authors' script, the conditional prediction alone before)."""
    m = get_mitigation(name, **settings)
    assert m.variant == {0.0: "Alg. 1 (guidance 0 before the switch)", -3.0: "Alg. 1, opposite guidance",
                         1.0: "official code (guidance 1 before the switch)"}[before]
    hook = m.guidance_hook(bundle, SETTINGS)
    x = torch.zeros(1, 4, 2, 2)
    scales = []
    for step, d in enumerate([9.0, 4.0, 1.0, 2.0, 5.0, 0.5]):
        eps_c = torch.zeros_like(x)
        eps_c.view(-1)[0] = d ** 0.5
        scales.append(float(hook(step, 999 - step, x, eps_c, torch.zeros_like(x))[0]))
    assert scales == [before] * 3 + [3.0] * 3
    if name == "guidance_opposite":
        with pytest.raises(MemtrainError, match="leave pre_switch_scale at 0"):
            get_mitigation(name, pre_switch_scale=1.0)


def test_decomposition_delta_is_exact_on_a_known_mixture():
    torch.manual_seed(0)
    x0, xT = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    abar = 0.36  # sqrt 0.6, sqrt(1 - abar) 0.8
    x_t = 0.7 * x0 + 0.5 * xT
    delta = decomposition_delta(x_t, x0, xT, abar)
    assert torch.allclose(delta, torch.full((2,), (0.7 - 0.6) - (0.5 - 0.8)), atol=1e-5)


@pytest.mark.parametrize("vocabulary", ["official", "whole_words"])
@pytest.mark.parametrize("name", ["rta", "rna"])
def test_random_insertion_changes_only_the_prompt_string(bundle, name, vocabulary):
    from memtrain.mitigations.random_insertion import official_token_ids, official_word

    m = get_mitigation(name, count=3, seed=7, vocabulary=vocabulary)
    rewritten = m.transform_prompts(PROMPT * 2 + ["two dogs"], bundle.tokenizer)
    assert rewritten[0] == rewritten[1] != PROMPT[0]  # seeded per prompt, not per batch position
    sep = " " if vocabulary == "official" else None  # the official insertion splits on single spaces
    added = [w for w in rewritten[0].split(sep) if w not in PROMPT[0].split(sep)]
    assert len(rewritten[0].split(sep)) == len(PROMPT[0].split(sep)) + 3 and added
    if name == "rna":
        limit = 100_000 if vocabulary == "official" else 10 ** 6
        assert all(w.isdigit() and int(w) < limit for w in added)
    elif vocabulary == "official":  # decoded token ids 0..49399, whole words or not
        drawn = {official_word(bundle.tokenizer, i) for i in range(official_token_ids(bundle.tokenizer))}
        assert all(w in drawn for w in added)
    else:
        vocab = bundle.tokenizer.get_vocab()
        assert all(f"{w}</w>" in vocab for w in added)
    assert m.variant == ("official (DCR)" if vocabulary == "official" else "whole_words")
    assert torch.equal(m.encode(bundle, PROMPT).embeddings, encode_prompts(bundle, rewritten[:1]).embeddings)
    assert m.sampling_kwargs(bundle, SETTINGS)["hook"] is None
    assert "prompt string" in m.threat_model_reason("embedding") and m.threat_model_reason("prompt") is None
    assert get_mitigation(name, seed=8, vocabulary=vocabulary).transform_prompts(PROMPT, bundle.tokenizer) != rewritten[:1]


def test_threat_models_are_checked():
    assert THREAT_MODELS == ("weights", "embedding", "prompt")
    with pytest.raises(MemtrainError, match="choose one of weights, embedding, prompt"):
        get_mitigation("nemo").threat_model_reason("api")
    nemo = get_mitigation("nemo")
    assert not nemo.bypassed_by("weights") and get_mitigation("pad_eot").bypassed_by("weights")
    with pytest.raises(MemtrainError, match="count must be >= 1"):
        get_mitigation("rta", count=0)
    with pytest.raises(MemtrainError, match="vocabulary 'clip' is not one of official, whole_words"):
        get_mitigation("rna", vocabulary="clip")


def test_overhead_benchmark_measures_every_mitigation(bundle):
    from memtrain.bench.attack_sampling import bench_mitigation_overhead

    ms = [get_mitigation(n) for n in SAMPLER_SIDE + ["rta"]]
    ratios = bench_mitigation_overhead(bundle, PROMPT, [0], SETTINGS, ms, repeats=1)
    assert set(ratios) == set(SAMPLER_SIDE + ["rta"]) and all(0 < r < float("inf") for r in ratios.values())


@pytest.mark.parametrize("name", ["ren", "ren_unmasked"])
def test_ren_rescales_the_first_tokens_cross_attention_logit_only_inside_its_call(bundle, name):
    from memtrain.mitigations.attention import cross_attention_keys, cross_attention_modules

    processors = {k: m.processor for k, m in cross_attention_modules(bundle.unet).items()}
    ren = get_mitigation(name)
    plain = sample(bundle, PROMPT, [0, 1], SETTINGS).images
    assert ren.bypassed_by("weights") and ren.threat_model_reason("embedding") is None
    forward = ren.unet_forward(bundle)
    x = torch.randn(2, bundle.latent_channels, bundle.sample_size, bundle.sample_size)
    y = encode_prompts(bundle, PROMPT * 2).embeddings
    t = torch.tensor(500)
    ones = get_mitigation(name, factor=1.0).unet_forward(bundle)(x, t, y)  # y not from encode: nothing masked
    assert torch.allclose(ones, bundle.unet(x, t, encoder_hidden_states=y).sample, atol=1e-5)  # factor 1: no change
    assert not torch.allclose(forward(x, t, y), ones, atol=1e-4)
    keys = cross_attention_keys(bundle.unet)
    assert keys and all(not m._forward_hooks for m in keys.values())  # hooks gone after the call
    assert {k: m.processor for k, m in cross_attention_modules(bundle.unet).items()} == processors
    images = sample(bundle, ren.encode(bundle, PROMPT), [0, 1], SETTINGS, **ren.sampling_kwargs(bundle, SETTINGS)).images
    assert not torch.equal(images, plain)
    assert torch.equal(sample(bundle, PROMPT, [0, 1], SETTINGS).images, plain)  # the plain pipeline is untouched
    y_adv = y.clone().requires_grad_(True)
    forward(x, t, y_adv).sum().backward()
    assert y_adv.grad is not None and torch.isfinite(y_adv.grad).all()  # the attack can push through it


def test_wen_optimizes_each_batchs_condition_once_and_only_below_its_target(bundle):
    plain = sample(bundle, PROMPT, [0, 1], SETTINGS).images
    idle = get_mitigation("wen", target_loss=1e9)  # already below the target: nothing to optimize
    kwargs = idle.sampling_kwargs(bundle, SETTINGS)
    assert torch.equal(sample(bundle, idle.encode(bundle, PROMPT), [0, 1], SETTINGS, **kwargs).images, plain)
    assert idle.details()["mean_steps"] == 0
    wen = get_mitigation("wen", target_loss=1e-6, max_steps=3)
    two_batches = dataclasses.replace(SETTINGS, batch_size=1)
    images = sample(bundle, wen.encode(bundle, PROMPT), [0, 1], two_batches, **wen.sampling_kwargs(bundle, two_batches)).images
    assert not torch.equal(images, plain)
    assert wen.details()["optimized_batches"] == 2 and wen.details()["mean_steps"] == 3  # once per trajectory
    assert wen.attack_forward(bundle) is None and wen.bypassed_by("weights")
