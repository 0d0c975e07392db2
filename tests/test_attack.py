"""The Dori attack (paper 004 Alg. 1) on a tiny random SD1.x-shaped bundle: it lowers the
diffusion loss, the batched run equals the per-target loop, targets are isolated, mitigation
transforms sit in the forward, the L2 ball holds, NaN targets are stopped and reported.
The real check on the memorizing testbed is in test_audit.py (slow tier)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

torch.set_num_threads(1)  # the 2 cores are shared with a long job

from factories import tiny_bundle  # noqa: E402
from memtrain.attack import (  # noqa: E402
    AttackConfig, DoriAttack, attack, attack_loop, attacked_condition, diffusion_loss,
)
from memtrain.core.diffusion import frozen  # noqa: E402
from memtrain.core.errors import MemtrainError  # noqa: E402
from memtrain.mitigations import get_mitigation  # noqa: E402
from memtrain.core.tokenizer import build_clip_tokenizer  # noqa: E402
from memtrain.core.text import encode_prompts  # noqa: E402

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night", "two dogs"]
QUICK = AttackConfig(steps=4, lr=0.05, noise_samples=3, seed=7)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def bundle(tokenizer):
    return tiny_bundle(None, tokenizer=tokenizer)


def latents_for(bundle, n: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth random images through the codec: plausible latents the tiny U-Net can see."""
    g = torch.Generator().manual_seed(seed)
    size = 2 * bundle.sample_size
    images = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size)
    return bundle.encode_images(images)


def fixed_noise(latents: torch.Tensor, k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    b = latents.shape[0]
    return torch.randn(b, k, *latents.shape[1:], generator=g), torch.randint(0, 1000, (b, k), generator=g)


def assert_same_adam_path(a: torch.Tensor, b: torch.Tensor, config: AttackConfig) -> None:
    """Equal up to float reassociation. Gradients agree to ~1e-6 relative, but Adam divides
    each element by its own gradient scale, so elements whose gradient is ~1e-10 (noise-level)
    can differ by a small fraction of their largest possible movement, lr per step."""
    diff = (a - b).abs()
    assert diff.max() <= 1e-3 * config.lr * config.steps, diff.max()
    assert diff.mean() <= 1e-6, diff.mean()


# --- configuration ------------------------------------------------------------------------------

def test_steps_must_be_positive(bundle):
    with pytest.raises(MemtrainError, match="attack steps must be >= 1"):
        AttackConfig(steps=0)
    config = AttackConfig()
    config.steps = 0  # changed after construction: attack re-checks
    with pytest.raises(MemtrainError, match="attack steps must be >= 1"):
        attack(bundle, latents_for(bundle, 1), PROMPTS[:1], config)


def test_alternate_init_is_resolved_per_epoch(bundle):
    config = AttackConfig(init="alternate")
    first, second = config.for_epoch(0, seed=5), config.for_epoch(1, seed=6)
    assert (first.init, first.seed, second.init, second.seed) == ("prompt", 5, "random", 6)
    with pytest.raises(MemtrainError, match="alternate"):  # never attacked unresolved
        attack(bundle, latents_for(bundle, 1), PROMPTS[:1], config)


def test_bad_settings_are_named():
    with pytest.raises(MemtrainError, match="other_prompt"):
        AttackConfig(init="other_prompt")
    with pytest.raises(MemtrainError, match="init 'typo'"):
        AttackConfig(init="typo")
    with pytest.raises(MemtrainError, match="timestep_range"):
        AttackConfig(timestep_range=(10, 2000)).timesteps(1000)


# --- optimization -------------------------------------------------------------------------------

def test_loss_decreases_under_fixed_noise(bundle):
    latents = latents_for(bundle, 2)
    config = AttackConfig(steps=25, lr=0.05, noise_samples=4)
    result = attack(bundle, latents, PROMPTS[:2], config)
    noise, times = fixed_noise(latents)
    start = encode_prompts(bundle, PROMPTS[:2]).embeddings
    before = diffusion_loss(bundle, latents, start, noise, times)
    after = diffusion_loss(bundle, latents, result.embeddings, noise, times)
    assert result.loss_trace.shape == (25, 2) and not result.failed
    assert (after < before).all(), (before, after)


@pytest.mark.parametrize("init", ["prompt", "random"])
def test_batched_equals_per_target_loop(bundle, init):
    """One optimizer on the stacked (B, 77, D) parameter with summed per-target losses takes
    the same Adam steps as one optimizer per target (Adam is element-wise); max_batch=5 also
    splits each step's 9 rows into chunks whose gradients are accumulated."""
    latents = latents_for(bundle)
    config = dataclasses.replace(QUICK, init=init, max_batch=5)
    batched = attack(bundle, latents, PROMPTS, config)
    looped = attack_loop(bundle, latents, PROMPTS, config)
    assert_same_adam_path(batched.embeddings, looped.embeddings, config)
    torch.testing.assert_close(batched.loss_trace, looped.loss_trace, atol=1e-6, rtol=1e-4)
    assert torch.equal(batched.layout.pad, looped.layout.pad)
    moved = (batched.embeddings - encode_prompts(bundle, PROMPTS).embeddings).abs().amax()
    assert init == "random" or moved > 1e-3


def test_chunking_does_not_change_the_result(bundle):
    latents = latents_for(bundle)
    whole = attack(bundle, latents, PROMPTS, dataclasses.replace(QUICK, max_batch=64))
    chunked = attack(bundle, latents, PROMPTS, dataclasses.replace(QUICK, max_batch=2))
    assert_same_adam_path(whole.embeddings, chunked.embeddings, QUICK)


def test_targets_are_isolated(bundle):
    latents = latents_for(bundle)
    other = latents.clone()
    other[1] = latents_for(bundle, 1, seed=99)[0]  # only target 1 changes
    a = attack(bundle, latents, PROMPTS, QUICK)
    b = attack(bundle, other, PROMPTS, QUICK)
    for k in (0, 2):
        assert_same_adam_path(a.embeddings[k], b.embeddings[k], QUICK)
    assert not torch.allclose(a.embeddings[1], b.embeddings[1])


def test_init_modes(bundle):
    latents = latents_for(bundle, 2)
    other = AttackConfig(init="other_prompt", other_prompt="a red car")
    state = DoriAttack(bundle, latents, PROMPTS[:2], other)
    expected = encode_prompts(bundle, ["a red car"]).embeddings.expand(2, -1, -1)
    torch.testing.assert_close(state.y.detach(), expected)
    assert torch.equal(state.layout.eot, encode_prompts(bundle, PROMPTS[:2]).layout.eot)
    rand = DoriAttack(bundle, latents, PROMPTS[:2], AttackConfig(init="random")).y.detach()
    assert abs(float(rand.std()) - 1.0) < 0.05 and not torch.allclose(rand[0], rand[1])


# --- mitigations in the forward -----------------------------------------------------------------

def test_pad_mask_gradient_is_zero_on_masked_pads(bundle):
    mitigation = get_mitigation("pad_mask", fraction=0.7)
    latents = latents_for(bundle, 2)
    state = DoriAttack(bundle, latents, PROMPTS[:2], QUICK, mitigation=mitigation)
    with frozen(bundle.unet):
        state.step()
    masked = mitigation.masked_positions(state.layout)
    grad = state.y.grad.cpu()
    assert masked.any()
    assert torch.count_nonzero(grad[masked]) == 0  # exactly zero, not just small
    assert grad[~masked].abs().sum() > 0
    result = attack(bundle, latents, PROMPTS[:2], QUICK, mitigation=mitigation)
    start = encode_prompts(bundle, PROMPTS[:2]).embeddings
    assert torch.equal(result.embeddings[masked], start[masked])  # Adam never moved them
    assert torch.count_nonzero(attacked_condition(result, mitigation)[masked]) == 0


def test_pad_eot_uses_its_tokenizer_and_transform(bundle):
    mitigation = get_mitigation("pad_eot")
    latents = latents_for(bundle, 2)
    result = attack(bundle, latents, PROMPTS[:2], QUICK, mitigation=mitigation)
    reference = mitigation.encode(bundle, PROMPTS[:2])
    assert torch.equal(result.layout.pad, reference.layout.pad.cpu())
    start = encode_prompts(bundle, PROMPTS[:2], tokenizer=mitigation.tokenizer(bundle)).embeddings
    eot = result.layout.eot
    assert torch.equal(result.embeddings[eot], start[eot])  # zeroed eot: no gradient reaches it
    assert torch.count_nonzero(attacked_condition(result, mitigation)[eot]) == 0
    assert torch.equal(attacked_condition(result), result.embeddings)


# --- constraints and failures -------------------------------------------------------------------

def test_l2_projection_keeps_norms_in_the_ball(bundle):
    latents = latents_for(bundle)
    start_norms = encode_prompts(bundle, PROMPTS).embeddings.flatten(1).norm(dim=1)
    radius = float(start_norms.min()) * 0.8  # every target starts outside the ball
    result = attack(bundle, latents, PROMPTS, dataclasses.replace(QUICK, l2_radius=radius))
    norms = result.embeddings.flatten(1).norm(dim=1)
    assert (norms <= radius * (1 + 1e-5)).all(), norms


def test_nan_target_is_stopped_and_reported(bundle):
    latents = latents_for(bundle)
    poisoned = latents.clone()
    poisoned[1, 0, 2, 3] = float("nan")
    result = attack(bundle, poisoned, PROMPTS, QUICK)
    clean = attack(bundle, latents, PROMPTS, QUICK)
    assert result.failed == [1]
    assert "non-finite loss" in result.reasons[1] and "step 0" in result.reasons[1]
    assert torch.isnan(result.loss_trace[:, 1]).all()
    start = encode_prompts(bundle, PROMPTS).embeddings
    assert torch.equal(result.embeddings[1], start[1])  # frozen at its last finite value
    for k in (0, 2):  # the others continue, unaffected
        assert torch.isfinite(result.loss_trace[:, k]).all()
        assert_same_adam_path(result.embeddings[k], clean.embeddings[k], QUICK)
    looped = attack_loop(bundle, poisoned, PROMPTS, QUICK)
    assert looped.failed == [1] and 1 in looped.reasons


def test_out_of_memory_halves_the_chunk_once_and_redoes_the_step(bundle, caplog):
    """9 rows per step in chunks of 8: the second chunk runs out of memory once, after the first
    one's backward. The step is redone from zero gradients in chunks of 4, so the attack equals
    one run with max_batch=4 from the start; a second out of memory is a one-line error."""
    latents = latents_for(bundle)
    config = dataclasses.replace(QUICK, max_batch=8)
    spent = []

    def once(x, t, y):
        if x.shape[0] == 1 and not spent:
            spent.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return bundle.unet(x, t, encoder_hidden_states=y).sample

    with caplog.at_level(logging.WARNING, logger="memtrain.attack.dori"):
        result = attack(bundle, latents, PROMPTS, config, unet_forward=once)
    reference = attack(bundle, latents, PROMPTS, dataclasses.replace(QUICK, max_batch=4))
    assert spent and torch.equal(result.embeddings, reference.embeddings)
    assert torch.equal(result.loss_trace, reference.loss_trace)
    assert "out of memory in stage 'attack'" in caplog.text and "batch 4" in caplog.text
    assert config.max_batch == 8  # the caller's (shared) config is left alone

    def small(x, t, y):
        if x.shape[0] > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")
        return bundle.unet(x, t, encoder_hidden_states=y).sample

    with pytest.raises(MemtrainError, match="out of memory in stage 'attack' at batch 4 even after halving"):
        attack(bundle, latents, PROMPTS, config, unet_forward=small)


# The real check on the memorizing testbed (the testbed attack recipe brings the memorized images
# back, MR >= 0.9 over 10 targets, and no held-out one, control MR <= 0.1) is the slow
# tests/test_audit.py::test_default_audit_on_the_real_testbed: the audit runs this attack on both
# splits, so a separate run here only repeated three minutes of CI.
