"""The loader, embedding and sampler path that SD v1.4 takes, on a random SD1.x-shaped model."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from memtrain.core.errors import MemtrainError
from memtrain.core.bundle import load_bundle
from memtrain.core.sampling import SamplerSettings, sample
from memtrain.core.text import encode_prompts


def test_load_encode_sample(sd_shaped_dir):
    bundle = load_bundle(sd_shaped_dir)
    assert type(bundle.vae).__name__ == "AutoencoderKL"
    emb = encode_prompts(bundle, ["a photo of a cat", "a dog"])
    assert emb.embeddings.shape == (2, 77, 768)
    assert emb.layout.eot_index.tolist() == [6, 3]
    settings = bundle.sampler_settings
    assert (settings.num_inference_steps, settings.guidance_scale) == (50, 7.5)
    out = sample(bundle, emb, seeds=[0, 1], settings=SamplerSettings(guidance_scale=7.5, num_inference_steps=3))
    assert out.images.shape == (2, 2, 3, 16, 16)
    assert 0 <= out.images.min() and out.images.max() <= 1
    # embeddings in, same images as prompts in
    again = sample(bundle, ["a photo of a cat", "a dog"], seeds=[0, 1], settings=SamplerSettings(guidance_scale=7.5, num_inference_steps=3))
    assert torch.equal(out.images, again.images)


def test_folder_loads_in_diffusers_pipeline(sd_shaped_dir):
    pipe = StableDiffusionPipeline.from_pretrained(sd_shaped_dir, safety_checker=None)
    assert pipe.unet.config.cross_attention_dim == 768


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])  # ddpm also draws noise at every step
def test_seed_determinism_independent_of_batch(sd_shaped_dir, scheduler):
    bundle = load_bundle(sd_shaped_dir)
    prompts = ["a photo of a cat", "a red house", "the moon"]
    full = sample(bundle, prompts, seeds=[3, 4], settings=SamplerSettings(num_inference_steps=3, batch_size=5, scheduler=scheduler))
    torch.manual_seed(123)  # the global RNG must not matter
    single = sample(bundle, prompts[1:2], seeds=[4], settings=SamplerSettings(num_inference_steps=3, batch_size=1, scheduler=scheduler))
    assert torch.allclose(full.images[1, 1], single.images[0, 0], atol=1e-5)
    assert not torch.allclose(full.images[1, 0], full.images[1, 1])


def test_guidance_hook_sees_steps_and_changes_output(sd_shaped_dir):
    bundle = load_bundle(sd_shaped_dir)
    seen = []

    def record(step, t, x_t, eps_c, eps_u):
        seen.append((step, t, tuple(x_t.shape), float((eps_c - eps_u).norm())))
        return None

    base = sample(bundle, ["a cat"], seeds=[0], settings=SamplerSettings(num_inference_steps=4), hook=record, return_trajectory=True)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[0][1] > seen[-1][1]
    assert all(s[3] > 0 for s in seen)
    assert len(base.trajectory_xt) == 4 and base.trajectory_x0[0].shape == base.latents.shape
    no_guidance = sample(bundle, ["a cat"], seeds=[0], settings=SamplerSettings(num_inference_steps=4), hook=lambda *a: 0.0)
    assert not torch.allclose(base.images, no_guidance.images)
    # guidance 0 everywhere equals sampling the unconditional model
    uncond = sample(bundle, [""], seeds=[0], settings=SamplerSettings(num_inference_steps=4, guidance_scale=1.0))
    assert torch.allclose(no_guidance.images, uncond.images, atol=1e-5)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm"])
def test_scheduler_choice(sd_shaped_dir, name):
    bundle = load_bundle(sd_shaped_dir)
    out = sample(bundle, ["a cat"], seeds=[0], settings=SamplerSettings(num_inference_steps=3, scheduler=name))
    assert torch.isfinite(out.images).all()
    # the fixture ships a PNDM config without clip_sample: SD latents are never clipped to [-1, 1]
    assert getattr(bundle.make_scheduler(name).config, "clip_sample", False) is False


def test_bad_inputs(sd_shaped_dir, tmp_path):
    with pytest.raises(MemtrainError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(MemtrainError, match="not a diffusers"):
        load_bundle(tmp_path)
    bundle = load_bundle(sd_shaped_dir)
    with pytest.raises(MemtrainError, match="unknown scheduler 'euler_x'"):
        sample(bundle, ["a"], seeds=[0], settings=SamplerSettings(scheduler="euler_x"))
    with pytest.raises(MemtrainError, match="seed list is empty"):
        sample(bundle, ["a"], seeds=[])
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd_shaped_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(MemtrainError, match="lacks the 'vae/' subfolder"):
        load_bundle(broken)
