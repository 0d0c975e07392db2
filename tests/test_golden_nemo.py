"""memtrain's NeMo against the numbers of its official code on the golden fixture.

Source of the numbers: tests/golden/official.json, key `nemo`, measured by running
* ml-research/localizing_memorization_in_diffusion_models @ f952eded64fca0bcf42e0bb3be9a01d64653cfdb:
  utils/activation_detection.py::compute_noise_diff, ::calculate_max_pairwise_ssim,
  ::initial_neuron_selection (guidance 0, seed 1, 10 samples, 50 DDIM steps) and the statistics
  formula of 1_compute_activations_statistics.py (over the fixture's 4 prompts);
* Lightning-AI/torchmetrics v1.3.2 (c1f83341c5c5d62bc711d3bd6288291b81e29c1a):
  src/torchmetrics/functional/image/ssim.py::multiscale_structural_similarity_index_measure.
Tolerances: ten times the float64-vs-float32 spread of the official code (MS-SSIM synthetic
abs 5e-5; noise diffs abs 1e-5; per-sample and max scores abs 2e-4; the 45 pairs abs 5e-4;
selections exact, order included)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from golden_fixture import OFFICIAL, PROMPTS, nemo_latents
from memtrain.core.bundle import ModelBundle
from memtrain.core.errors import MemtrainError
from memtrain.core.text import encode_prompts
from memtrain.metrics.ms_ssim import batch_data_range, max_pairwise_ssim, ms_ssim, pairwise_ms_ssim
from memtrain.metrics.signals import SSIM_RANGES, detection_latents
from memtrain.mitigations.nemo import NeMo
from memtrain.mitigations.nemo_neurons import activation_profile, candidate_neurons, value_layers
from memtrain.mitigations.nemo_stats import load_statistics

GOLD = OFFICIAL["nemo"]
SEEDS = list(range(10))  # with noise="official" only the count matters: NeMo's 10 samples


@pytest.fixture(scope="module")
def bundle(golden, one_thread):
    """The golden fixture as a memtrain bundle, its latents 64 x 64 (NeMo's code hard-codes
    512 px / 8, SD v1.4's sample_size). The U-Net is copied so the shared fixture is untouched."""
    unet = copy.deepcopy(golden.unet)
    unet.register_to_config(sample_size=64)
    return ModelBundle(unet=unet, text_encoder=golden.text_encoder, tokenizer=golden.tokenizer,
                       vae=torch.nn.Identity(), scheduler=golden.scheduler, source="golden")


def _synthetic():
    gen = lambda k: torch.Generator().manual_seed(k)  # noqa: E731
    x, z = torch.randn((4, 4, 64, 64), generator=gen(101)), torch.randn((4, 4, 64, 64), generator=gen(102))
    rho = torch.tensor(GOLD["ms_ssim_synthetic"]["rho"]).view(-1, 1, 1, 1)

    def minmax(t):
        low, high = t.amin((2, 3), keepdim=True), t.amax((2, 3), keepdim=True)
        return (t - low) / (high - low)
    return minmax(x), minmax(rho * x + (1 - rho**2).sqrt() * z)


def test_ms_ssim_matches_torchmetrics_on_synthetic_pairs():
    gold = GOLD["ms_ssim_synthetic"]
    a, b = _synthetic()
    assert np.allclose(a[0, 0, 0, :4], gold["A[0,0,0,:4]"], atol=1e-6)
    assert np.allclose(b[3, 3, 63, 60:64], gold["B[3,3,63,60:64]"], atol=1e-6)
    assert np.allclose(ms_ssim(a, b), gold["batch4_data_range_None"], atol=5e-5, rtol=0)
    single = torch.cat([ms_ssim(a[i:i + 1], b[i:i + 1]) for i in range(4)])
    assert np.allclose(single, gold["single_pair_data_range_None"], atol=5e-5, rtol=0)
    assert np.allclose(ms_ssim(a, b, data_range=1.0), gold["batch4_data_range_1.0"], atol=5e-5, rtol=0)
    ranges = []
    for _ in range(3):
        ranges.append(float(batch_data_range(a, b)))
        a, b = torch.nn.functional.avg_pool2d(a, 2), torch.nn.functional.avg_pool2d(b, 2)
    assert np.allclose(ranges, gold["batch4_data_range_per_scale"], atol=5e-5, rtol=0)


def test_official_draw_is_one_batch_from_seed_1():
    assert torch.equal(detection_latents("official", SEEDS, (4, 64, 64)), nemo_latents())
    per_seed = detection_latents("per_seed", [3, 4], (4, 8, 8))
    assert torch.equal(per_seed[1], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_detection_score_matches_the_official_code(bundle, prompt):
    gold = GOLD["detection_score"][prompt]
    nemo = NeMo()  # defaults: noise="official", ssim_range="batch", timestep_index 1 of 50
    diffs = nemo.noise_diffs(bundle, prompt, SEEDS)
    assert diffs.shape == (10, 4, 64, 64)
    assert abs(float(diffs.mean()) - gold["noise_diff_mean"]) <= 1e-5
    assert np.allclose(diffs[0, 0, 0, :4], gold["noise_diff[0,0,0,:4]"], atol=1e-5, rtol=0)
    assert np.allclose(diffs[9, 3, 63, 60:64], gold["noise_diff[9,3,63,60:64]"], atol=1e-5, rtol=0)
    _, pairwise = pairwise_ms_ssim(diffs)
    assert np.allclose(pairwise, gold["pairwise_45"], atol=5e-4, rtol=0)
    per_sample = max_pairwise_ssim(diffs)
    assert np.allclose(per_sample, gold["max_pairwise_per_sample"], atol=2e-4, rtol=0)
    assert abs(float(per_sample.max()) - gold["score_max"]) <= 2e-4
    # the batch range makes a pair's value depend on its call: pair (0, 1) alone differs
    assert abs(float(ms_ssim(diffs[:1], diffs[1:2])) - gold["pair_0_1_alone"]) <= 2e-4
    # ssim_range="fixed" (memtrain's former default, data_range 1.0) is another score, not a rounding
    assert float(max_pairwise_ssim(diffs, SSIM_RANGES["fixed"]).max()) - gold["score_max"] > 0.02
    if prompt == PROMPTS[0]:  # the public entry point, end to end (one more U-Net call)
        assert abs(nemo.memorization_score(bundle, prompt, SEEDS) - gold["score_max"]) <= 2e-4


@pytest.fixture(scope="module")
def statistics(bundle, tmp_path_factory):
    """The statistics as 1_compute_activations_statistics.py forms them (per prompt, mean and
    unbiased std over the fixture's 4 prompts), saved in NeMo's published torch.save format."""
    layers = value_layers(bundle.unet)
    with torch.no_grad():
        per_prompt = [activation_profile(layers, encode_prompts(bundle, [p]).embeddings) for p in PROMPTS]
    stacked = [torch.cat([a[name] for a in per_prompt]) for name in layers]
    path = tmp_path_factory.mktemp("nemo_stats") / "statistics_fixture.pt"
    torch.save(([s.mean(dim=0) for s in stacked], [s.std(dim=0) for s in stacked]), path)
    return path, layers, per_prompt


def test_official_statistics_file_loads_and_matches(statistics):
    path, layers, per_prompt = statistics
    gold = GOLD["initial_neuron_selection"]
    assert [layer.out_features for layer in layers.values()] == gold["statistics"]["layer_widths"]
    mean, std = load_statistics(path, layers)
    names = list(layers)
    for key, values in (("mean[0][:4]", mean[names[0]][:4]), ("std[0][:4]", std[names[0]][:4]),
                        ("mean[6][:4]", mean[names[6]][:4]), ("std[6][:4]", std[names[6]][:4])):
        assert np.allclose(values, gold["statistics"][key], atol=1e-5, rtol=0), key
    for prompt, activation in zip(PROMPTS, per_prompt):
        for name, expected in zip(names, gold["activations_per_prompt"][prompt]):
            assert np.allclose(activation[name][0], expected, atol=1e-5, rtol=0), (prompt, name)


@pytest.mark.parametrize("setting", list(GOLD["initial_neuron_selection"]["selections"]))
def test_initial_selection_matches_the_official_lists(statistics, setting):
    path, layers, per_prompt = statistics
    theta, k = (float(part.split("=")[1]) for part in setting.split(","))
    mean, std = load_statistics(path, layers)
    for prompt, activation in zip(PROMPTS, per_prompt):
        gold = GOLD["initial_neuron_selection"]["selections"][setting][prompt]
        chosen = candidate_neurons({n: a[0] for n, a in activation.items()}, mean, std, theta, int(k))
        assert list(chosen.values()) == gold["official_lists"], prompt  # order and duplicates
        assert [sorted(set(rows)) for rows in chosen.values()] == gold["sorted_unique"], prompt


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_malformed_official_statistics_are_refused(statistics, tmp_path):
    path, layers, _ = statistics
    mean, std = torch.load(path, weights_only=True)
    bad = {
        "wrong count": (mean[:6], std[:6]),
        "wrong width": (mean, std[:3] + [torch.ones(31)] + std[4:]),
        "NaN": (mean[:1] + [torch.full_like(mean[1], float("nan"))] + mean[2:], std),
        "std 0": (mean, std[:6] + [torch.zeros_like(std[6])]),
        "not a tuple": [mean, std],
        "2-d": (mean, [s[None] for s in std]),
    }
    messages = {"wrong count": "6 mean tensors", "wrong width": r"std\[3\] has shape \(31,\)",
                "NaN": r"mean\[1\] has non-finite", "std 0": r"std\[6\] has values <= 0",
                "not a tuple": "expected a tuple", "2-d": r"std\[0\] has shape \(1, 32\)"}
    for label, obj in bad.items():
        file = _save(tmp_path / f"{label.replace(' ', '_')}.pt", obj)
        with pytest.raises(MemtrainError, match=messages[label]) as err:
            load_statistics(file, layers)
        assert str(file) in str(err.value) and "\n" not in str(err.value), label
