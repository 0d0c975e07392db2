"""The full-size benchmark's parts on a config-built SD-shaped model: diffusers' pipeline runs on
memtrain's own modules with the same settings, the attack's FLOP/s are counted, the report ends
with `ratio:` (the figures themselves are the benchmark's, run on the full-size fixtures)."""

from __future__ import annotations

import torch

from memtrain.attack import AttackConfig
from memtrain.bench.full_size import bench_full_attack, bench_generation, format_full_size, reference_pipeline
from memtrain.core.bundle import load_bundle
from memtrain.core.sampling import SamplerSettings, sample


def test_pipeline_shares_the_weights_and_matches_memtrains_images_in_shape(sd_shaped_dir):
    bundle = load_bundle(sd_shaped_dir)
    settings = SamplerSettings(num_inference_steps=2, guidance_scale=7.5)
    pipe = reference_pipeline(bundle, settings)
    assert pipe.unet is bundle.unet and pipe.text_encoder is bundle.text_encoder and pipe.vae is bundle.vae
    side = bundle.pixel_resolution
    theirs = pipe("a photo", height=side, width=side, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    ours = sample(bundle, ["a photo"], [0], settings).images
    assert theirs.shape[-2:] == ours.shape[-2:] == (side, side)


def test_generation_and_attack_figures_and_report(sd_shaped_dir):
    bundle = load_bundle(sd_shaped_dir)
    gen = bench_generation(bundle, ["a photo", "a cat"], [0, 1], SamplerSettings(num_inference_steps=2), repeats=1)
    assert gen["images"] == 4 and gen["ratio"] > 0 and gen["resolution"] == bundle.pixel_resolution
    att = bench_full_attack(bundle, None, 2, AttackConfig(steps=1, noise_samples=1), matmul_size=512)
    assert att["targets"] == 2 and att["step_tflops_per_s"] > 0 and 0 < att["fraction_of_matmul"]
    text = format_full_size("sd-shaped", "cpu", gen, att, None)
    assert text.splitlines()[-1] == f"ratio: {gen['ratio']:.2f}" and "512x512 float32 matmul" in text
