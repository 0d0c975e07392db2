"""Half precision end to end: the tiny SD-layout models of tests/factories.py in bf16
and fp16 (both run on CPU in torch, so dtype bugs show up here; speed does not): every sampler
gives finite images of the right shape, the Dori attack keeps y_adv in float32 and in fp16 scales
its loss so small gradients survive (halving the scale on overflow, with the same noise), the
prompt attack runs, and every registered mitigation prepares, applies, transforms, samples, is
attacked and undoes bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from factories import tiny_bundle
from memtrain.attack import AttackConfig, DoriAttack, PromptAttack, attack, attacked_condition, diffusion_loss
from memtrain.attack.dori import FP16_LOSS_SCALE, MIN_LOSS_SCALE
from memtrain.core.bundle import load_bundle
from memtrain.core.diffusion import frozen
from memtrain.core.sampling import SamplerSettings, sample
from memtrain.core.text import encode_prompts
from memtrain.mitigations import PruningMitigation, applied, available_mitigations, get_mitigation

PROMPTS = ["a photo of a cat", "two dogs"]
REFERENCE = ["a red car", "a house by the sea"]
SEEDS = [0, 1]
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
QUICK = AttackConfig(steps=3, lr=0.05, noise_samples=2, seed=3)
FEW_STEPS = SamplerSettings(scheduler="ddim", guidance_scale=3.0, num_inference_steps=3)
# each mitigation's cheapest settings that still run its whole prepare path (nemo: tau_mem -1
# counts every seed as memorized, so detection, selection and refinement all run)
FAST = {
    "nemo": dict(tau_mem=-1.0, num_seeds=2, num_inference_steps=4, refinement_budget=4),
    "wanda": dict(sparsity=1 / 16, timesteps=2, num_inference_steps=4, num_seeds=1),
    "wen": dict(target_loss=1e-6, max_steps=2),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(params=HALF)
def half(request, tokenizer):
    """The tiny bundle converted to bf16 / fp16 (a fresh one per test: mitigations edit weights)."""
    return tiny_bundle(None, tokenizer=tokenizer).to(dtype=request.param)


def latents_for(bundle, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = bundle.pixel_resolution
    images = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size)
    return bundle.encode_images(images).float()


def weights(bundle) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder", "vae")
            for k, v in getattr(bundle, part).state_dict().items()}


def assert_bit_identical(before: dict, bundle) -> None:
    after = weights(bundle)
    changed = [k for k, v in before.items() if v.dtype != after[k].dtype or not torch.equal(
        v.view(torch.int16) if v.dtype in (torch.float16, torch.bfloat16) else v,
        after[k].view(torch.int16) if after[k].dtype in (torch.float16, torch.bfloat16) else after[k])]
    assert not changed, changed[:5]


# --- sampling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
def test_every_sampler_gives_finite_images_on_the_sd_layout(sd_shaped_dir, dtype):
    """AutoencoderKL, 768-d CLIP tower, 4-level U-Net (the layout SD v1.4 loads with)."""
    bundle = load_bundle(sd_shaped_dir).to(dtype=dtype)
    assert bundle.dtype == dtype and bundle.vae.dtype == dtype
    for scheduler in ("ddim", "ddpm", "dpm"):
        settings = dataclasses.replace(FEW_STEPS, scheduler=scheduler)
        out = sample(bundle, PROMPTS, SEEDS, settings)
        side = bundle.pixel_resolution
        assert out.images.shape == (2, 2, 3, side, side) and out.images.dtype == torch.float32
        assert torch.isfinite(out.images).all() and torch.isfinite(out.latents).all(), scheduler


def test_samplers_on_the_tiny_bundle(half):
    for scheduler in ("ddim", "ddpm", "dpm"):
        settings = dataclasses.replace(FEW_STEPS, scheduler=scheduler)
        out = sample(half, PROMPTS[:1], SEEDS, settings, return_trajectory=True)
        assert out.images.shape == (1, 2, 3, half.pixel_resolution, half.pixel_resolution)
        assert torch.isfinite(out.images).all() and all(torch.isfinite(x).all() for x in out.trajectory_x0)


# --- the Dori attack ----------------------------------------------------------------------------

def test_dori_attack_runs_with_float32_state(half):
    latents = latents_for(half)
    config = dataclasses.replace(QUICK, steps=8)
    state = DoriAttack(half, latents, PROMPTS, config)
    assert state.y.dtype == torch.float32
    expected_scale = FP16_LOSS_SCALE if half.dtype == torch.float16 else 1.0
    assert state.loss_scale == expected_scale
    result = state.run()
    assert not result.failed and torch.isfinite(result.loss_trace).all()
    assert result.embeddings.dtype == torch.float32 and state.y.dtype == torch.float32
    for group in state.optimizer.state.values():  # Adam's moments stay float32 too
        assert all(v.dtype == torch.float32 for v in group.values() if torch.is_tensor(v) and v.dim())
    g = torch.Generator().manual_seed(5)
    noise, times = torch.randn(2, 8, *latents.shape[1:], generator=g), torch.randint(0, 1000, (2, 8), generator=g)
    before = diffusion_loss(half, latents, encode_prompts(half, PROMPTS).embeddings, noise, times)
    after = diffusion_loss(half, latents, result.embeddings, noise, times)
    assert torch.isfinite(after).all()
    assert (after <= before * 1.02).all(), (before, after)  # lower, or at worst level within rounding


def output_times(factor: float):
    """A U-Net call whose output is multiplied by `factor`: the loss is unchanged in size but
    every gradient below the output is `factor` times smaller (or larger)."""
    def forward_for(bundle):
        return lambda x, t, y: bundle.unet(x, t, encoder_hidden_states=y).sample * factor
    return forward_for


def first_step_grad(bundle, latents, forward, loss_scale: float | None = None) -> tuple[torch.Tensor, DoriAttack]:
    state = DoriAttack(bundle, latents, PROMPTS, QUICK, unet_forward=forward)
    if loss_scale is not None:
        state.loss_scale = loss_scale
    with frozen(bundle.unet):
        state.step()
    return state.y.grad.detach().clone(), state


def test_fp16_loss_scaling_keeps_small_gradients(tokenizer):
    """Gradients ~1e-4 of normal size flush to zero in fp16 without a loss scale; scaled, the
    fp16 gradient matches the float32 one."""
    reference = tiny_bundle(None, tokenizer=tokenizer)
    latents = latents_for(reference)
    shrink = 1e-4
    exact, _ = first_step_grad(reference, latents, output_times(shrink)(reference))
    fp16 = tiny_bundle(None, tokenizer=tokenizer).to(dtype=torch.float16)
    scaled, state = first_step_grad(fp16, latents, output_times(shrink)(fp16))
    unscaled, _ = first_step_grad(fp16, latents, output_times(shrink)(fp16), loss_scale=MIN_LOSS_SCALE)
    assert state.loss_scale == FP16_LOSS_SCALE  # nothing overflowed

    def nonzero(g):
        return float((g != 0).float().mean())

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    assert nonzero(exact) > 0.99
    assert nonzero(unscaled) < 0.5 * nonzero(exact)  # most of it underflowed
    assert nonzero(scaled) > 0.95 * nonzero(exact)
    assert cosine(scaled, exact) > 0.99 > cosine(unscaled, exact)
    # unscaled for Adam: the same size as the float32 gradient, not 2**16 times it
    assert 0.5 < float(scaled.norm() / exact.norm()) < 2


class _AmplifyGrad(torch.autograd.Function):
    """Identity forward, gradient x `factor` backward (an fp16 overflow the loss never sees)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def test_fp16_overflow_halves_the_scale_and_redoes_the_step(tokenizer):
    fp16 = tiny_bundle(None, tokenizer=tokenizer).to(dtype=torch.float16)
    latents = latents_for(fp16)

    def amplified(x, t, y):
        out = fp16.unet(x, t, encoder_hidden_states=y).sample
        return _AmplifyGrad.apply(out, 2.0**12)  # 2**16 * 2**12 overflows fp16's 65504

    state = DoriAttack(fp16, latents, PROMPTS, QUICK, unet_forward=amplified)
    draws = []
    original = state._chunk_loss

    def spy(owners, noise, times):
        draws.append(noise.clone())
        return original(owners, noise, times)

    state._chunk_loss = spy
    with frozen(fp16.unet):
        losses = state.step()
    assert 1.0 <= state.loss_scale < FP16_LOSS_SCALE and not state.failed
    assert len(draws) > 1 and all(torch.equal(d, draws[0]) for d in draws)  # redone with the same noise
    assert torch.isfinite(losses).all() and torch.isfinite(state.y).all()
    # the kept gradient is unscaled: the plain U-Net's at scale (kept scale x 2**12) has the same
    # fp16 intermediates (powers of two are exact), so it is the same gradient x 2**12
    plain, _ = first_step_grad(fp16, latents, None, loss_scale=state.loss_scale * 2.0**12)
    torch.testing.assert_close(state.y.grad / 2.0**12, plain, rtol=1e-6, atol=0)


def test_fp16_non_finite_loss_stops_only_that_target(tokenizer):
    """A NaN latent is the target's own failure: it is stopped as in fp32, the loss scale is
    not spent on it and the other target goes on."""
    fp16 = tiny_bundle(None, tokenizer=tokenizer).to(dtype=torch.float16)
    poisoned = latents_for(fp16)
    poisoned[1, 0, 2, 3] = float("nan")
    state = DoriAttack(fp16, poisoned, PROMPTS, QUICK)
    result = state.run()
    assert result.failed == [1] and "non-finite loss" in result.reasons[1]
    assert state.loss_scale == FP16_LOSS_SCALE
    assert torch.isfinite(result.loss_trace[:, 0]).all()


def test_fp16_gradient_non_finite_even_unscaled_stops_that_target(tokenizer):
    """A gradient that stays non-finite at the scale floor is the target's own: stopped; the
    other target keeps the largest scale at which it was fine."""
    fp16 = tiny_bundle(None, tokenizer=tokenizer).to(dtype=torch.float16)
    latents = latents_for(fp16)
    k = QUICK.noise_samples

    class PoisonRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.view_as(y)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            grad[k:] = float("inf")  # rows of target 1 (one chunk: target 0's rows come first)
            return grad

    def forward(x, t, y):
        return fp16.unet(x, t, encoder_hidden_states=PoisonRows.apply(y) if len(y) == 2 * k else y).sample

    state = DoriAttack(fp16, latents, PROMPTS, QUICK, unet_forward=forward)
    with frozen(fp16.unet):
        state.step()
        assert state.failed == [1] and "non-finite gradient" in state.reasons[1]
        assert state.loss_scale == FP16_LOSS_SCALE  # target 0 never overflowed
        state.step()
    assert torch.isfinite(state.y).all() and torch.isfinite(torch.stack(state.trace)[:, 0]).all()


def test_prompt_attack_runs(half):
    latents = latents_for(half)
    state = PromptAttack(half, latents, PROMPTS, QUICK)
    result = state.run()
    assert state.y.dtype == torch.float32 and result.embeddings.dtype == torch.float32
    assert not result.failed and torch.isfinite(result.loss_trace).all()
    assert len(result.prompts) == 2 and all(p.strip() for p in result.prompts)
    # the string re-encodes through the deployed (half-precision) text path
    assert torch.isfinite(encode_prompts(half, result.prompts).embeddings).all()


# --- every mitigation ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", available_mitigations())
def test_every_mitigation_round_trip(half, name):
    """prepare, apply, transform, sample, attack (embedding and, for the text path, prompt),
    undo: all finite, and the weights bit for bit as before prepare."""
    bundle = half
    before = weights(bundle)
    m = get_mitigation(name, **FAST.get(name, {}))
    m.prepare(bundle, PROMPTS, REFERENCE, SEEDS)
    latents = latents_for(bundle, 1)
    with applied(m, bundle):
        if isinstance(m, PruningMitigation):  # prepare found something to prune in this precision
            after = weights(bundle)
            assert any(not torch.equal(v, after[k]) for k, v in before.items())
        encoded = m.encode(bundle, PROMPTS[:1])
        assert torch.isfinite(encoded.embeddings.float()).all()
        y = torch.randn(1, 77, bundle.embedding_dim, requires_grad=True)
        out = m.transform_embeddings(y.to(bundle.dtype), encoded.layout)
        assert out.dtype == bundle.dtype and torch.isfinite(out.float()).all()
        images = sample(bundle, encoded, SEEDS, FEW_STEPS, **m.sampling_kwargs(bundle, FEW_STEPS)).images
        assert torch.isfinite(images).all()
        result = attack(bundle, latents, PROMPTS[:1], QUICK, mitigation=m)
        assert not result.failed and torch.isfinite(result.loss_trace).all(), result.reasons
        assert result.embeddings.dtype == torch.float32
        cond = attacked_condition(result, m)
        attacked = sample(bundle, cond, SEEDS[:1], FEW_STEPS, **m.sampling_kwargs(bundle, FEW_STEPS)).images
        assert torch.isfinite(attacked).all()
        if name in ("pad_eot", "rta"):  # a text-path and a prompt-string mitigation under the prompt attack
            prompt = PromptAttack(bundle, latents, PROMPTS[:1], dataclasses.replace(QUICK, steps=2), mitigation=m).run()
            assert not prompt.failed and torch.isfinite(prompt.loss_trace).all()
    if name == "wen":  # it optimized the condition (in float32) rather than skipping
        assert m.details()["optimized_batches"] > 0 and m.details()["mean_steps"] > 0
    assert_bit_identical(before, bundle)
