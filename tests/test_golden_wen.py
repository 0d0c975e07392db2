"""Wen et al.'s detector and mitigation against the official code's numbers on the golden fixture.

Source: YuxinWenRick/diffusion_memorization@c8fe471d80b62213bdc8a384543ff44b44c62020,
local_sd_pipeline.py::LocalStableDiffusionPipeline.__call__ (track_noise_norm: per-step
||eps_c - eps_u|| per image, two seeds in one batch of 2, DDIM 50 steps, guidance 7.5) and
local_sd_pipeline.py::LocalStableDiffusionPipeline.aug_prompt (lr 0.05, 4 AdamW updates, target
never reached), run on the fixture; numbers in tests/golden/official.json (`wen_detection`,
`wen_mitigation`). Tolerances: rel 1e-4 (first step, 50-step mean, losses, norms), rel 5e-4 per
step, rel 1e-3 on the start token's shift, abs 1e-4 on entries (float64 re-runs of the official
code moved them by <= 1.4e-6 relative, entries by <= 1e-5)."""

import numpy as np
import pytest
import torch

from golden_bundle import golden_bundle
from golden_fixture import OFFICIAL, PROMPTS, latent
from memtrain.core.sampling import SamplerSettings
from memtrain.eval.detect import wen_magnitude, wen_step_magnitudes
from memtrain.mitigations import get_mitigation

SEEDS = [0, 1]
SETTINGS = SamplerSettings(scheduler="ddim", num_inference_steps=50, guidance_scale=7.5)


@pytest.fixture(scope="module")
def bundle(golden):
    return golden_bundle(golden)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_wen_first_step_and_all_steps_match_the_official_tracking(bundle, prompt):
    gold = OFFICIAL["wen_detection"][prompt]
    first = [gold[str(s)]["first_step"] for s in SEEDS]
    assert np.isclose(wen_magnitude(bundle, prompt, SEEDS, SETTINGS), np.mean(first), rtol=1e-4)

    per_step = wen_step_magnitudes(bundle, prompt, SEEDS, SETTINGS)  # (50, seeds), both seeds in one batch
    for k, seed in enumerate(SEEDS):
        assert np.allclose(per_step[:, k], gold[str(seed)]["per_step"], rtol=5e-4, atol=0), seed
        assert np.isclose(float(per_step[:, k].mean()), gold[str(seed)]["mean_50_steps"], rtol=1e-4), seed
    # wen_all_steps is the mean of these
    assert np.isclose(float(per_step.mean()), np.mean([gold[str(s)]["mean_50_steps"] for s in SEEDS]), rtol=1e-4)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_wen_mitigated_embedding_matches_aug_prompt(bundle, prompt):
    gold = OFFICIAL["wen_mitigation"][prompt]
    wen = get_mitigation("wen", lr=0.05, max_steps=4, target_loss=1e-9)  # never reached: exactly 4 updates
    e0 = wen.encode(bundle, [prompt]).embeddings
    e = wen.optimize(bundle, latent(0)[None], torch.tensor(981), e0, wen.unconditional(bundle))
    log = wen.details()
    assert log["mean_steps"] == 4
    assert np.isclose(log["mean_final_magnitude"], gold["losses_before_each_update"][-1], rtol=1e-4)
    assert np.isclose(float(e.norm()), gold["norm"], rtol=1e-4)
    assert np.isclose(float(e0.norm()), gold["init_norm"], rtol=1e-4)
    assert np.isclose(float((e - e0).norm()), gold["diff_norm"], rtol=1e-4)
    assert np.isclose(float((e[0, 0] - e0[0, 0]).norm()), gold["diff_norm_position0"], rtol=1e-3)
    assert np.isclose(float((e[0, 1:] - e0[0, 1:]).norm()), gold["diff_norm_positions_1_76"], rtol=1e-4)
    for pos in (0, 1, 5, 76):
        assert np.allclose(e[0, pos, :4], gold[f"e[0,{pos},:4]"], rtol=0, atol=1e-4), pos


def test_wen_losses_before_each_update(bundle):
    """The magnitude seen before update k is the one after k - 1 updates."""
    prompt = PROMPTS[1]
    gold = OFFICIAL["wen_mitigation"][prompt]["losses_before_each_update"]
    wen = get_mitigation("wen", lr=0.05, max_steps=4, target_loss=1e-9)
    e0, u = wen.encode(bundle, [prompt]).embeddings, wen.unconditional(bundle)
    for k in range(1, 4):
        wen._log.clear()
        wen.max_steps = k
        wen.optimize(bundle, latent(0)[None], torch.tensor(981), e0, u)
        assert np.isclose(wen._log[-1]["final_magnitude"], gold[k - 1], rtol=1e-4), k


def test_wen_shares_one_embedding_per_prompt_and_stops_at_target(bundle):
    """Two images of one prompt get one embedding and one loss over both; a target above the
    first loss means no update at all (the official test is <=)."""
    wen = get_mitigation("wen", lr=0.05, max_steps=2, target_loss=1e-9)
    e0, u = wen.encode(bundle, [PROMPTS[0]]).embeddings, wen.unconditional(bundle)
    x = torch.stack([latent(0), latent(1)])
    e = wen.optimize(bundle, x, torch.tensor(981), e0.expand(2, -1, -1), u.expand(2, -1, -1))
    assert torch.equal(e[0], e[1]) and not torch.equal(e[0], e0[0])
    idle = get_mitigation("wen", target_loss=10.0)
    assert torch.equal(idle.optimize(bundle, x, torch.tensor(981), e0.expand(2, -1, -1), u.expand(2, -1, -1))[0], e0[0])
