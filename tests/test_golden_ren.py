"""Ren et al.'s mitigation (`ren`) against the official MemAttn code's numbers on the golden fixture.

Source: renjie3/MemAttn@c66efd22d8ffd4b1c6b87835708fa1437a2e076b,
refactored_classes/refactored_attention_processor.py::AttnProcessor2_0.__call__ and
::my_simple_scaled_dot_product_attention (the refactored U-Net's forward with miti_mem, c1 and
cross_attn_mask), run on the fixture; numbers in tests/golden/official.json (`ren`,
`ren_setting`). One U-Net call at t = 981 on cat([latent(0), latent(0)]) with cat([E(""), E(P)]),
guided = out_u + 7.5 (out_c - out_u). Tolerances: rel 1e-4 on norms, abs 1e-4 on differences and
entries (float64 re-runs of the official code moved them by <= 1.4e-6 relative)."""

import numpy as np
import pytest
import torch

from golden_bundle import golden_bundle
from golden_fixture import OFFICIAL, PROMPTS, latent
from memtrain.mitigations import get_mitigation

SETTING = OFFICIAL["ren_setting"]
VARIANTS = {"scale1.25_mask": ("ren", {}), "scale1.25_nomask": ("ren", {"mask": False}),
            "scale1.0_mask": ("ren", {"factor": 1.0}), "official_no_mitigation": ("none", {})}


@pytest.fixture(scope="module")
def bundle(golden):
    return golden_bundle(golden)


def _outputs(bundle, name: str, settings: dict, prompt: str) -> torch.Tensor:
    """The mitigated U-Net call as memtrain's sampler makes it: raw outputs (2, 4, 16, 16)."""
    m = get_mitigation(name, **settings)
    x = latent(SETTING["latent_seed"])[None]
    y = torch.cat([m.unconditional(bundle), m.encode(bundle, [prompt]).embeddings])
    forward = m.unet_forward(bundle) or (lambda x, t, y: bundle.unet(x, t, encoder_hidden_states=y).sample)
    with torch.no_grad():
        return forward(torch.cat([x, x]), torch.tensor(SETTING["t"]), y)


def _guided(out: torch.Tensor) -> torch.Tensor:
    return out[:1] + SETTING["guidance_scale"] * (out[1:] - out[:1])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ren_guided_prediction_matches_memattn(bundle, prompt):
    gold = OFFICIAL["ren"][prompt]
    plain = _outputs(bundle, "none", {}, prompt)
    assert np.isclose(float(_guided(plain).norm()), gold["plain_guided_norm"], rtol=1e-4)
    for variant, (name, settings) in VARIANTS.items():
        g, out = gold[variant], _outputs(bundle, name, settings, prompt)
        guided = _guided(out)
        assert np.isclose(float(guided.norm()), g["guided_norm"], rtol=1e-4), variant
        rel = float((guided - _guided(plain)).norm() / _guided(plain).norm())
        assert abs(rel - g["rel_diff_from_plain_guided"]) < 1e-4, variant
        for half, key in ((1, "cond_rel_diff_from_plain"), (0, "uncond_rel_diff_from_plain")):
            rel = float((out[half] - plain[half]).norm() / plain[half].norm())
            assert abs(rel - g[key]) < 1e-4, (variant, key)
        assert np.allclose(guided[0, 0, 0, :4], g["guided[0,0,0,:4]"], rtol=0, atol=1e-4), variant
        assert np.allclose(guided[0, 3, 15, 12:16], g["guided[0,3,15,12:16]"], rtol=0, atol=1e-4), variant


def test_ren_without_edits_is_the_plain_unet_and_unmasked_keeps_the_old_reading(bundle):
    """factor 1 without the mask changes nothing (explicit softmax vs the fused kernel: float
    noise); `ren_unmasked` scales both branches, so its unconditional half moves too."""
    prompt = PROMPTS[0]
    plain = _outputs(bundle, "none", {}, prompt)
    assert torch.allclose(_outputs(bundle, "ren", {"factor": 1.0, "mask": False}, prompt), plain, atol=1e-5)
    old = _outputs(bundle, "ren_unmasked", {}, prompt)
    official = _outputs(bundle, "ren", {"mask": False}, prompt)
    assert torch.allclose(old[1], official[1], atol=1e-5)  # conditional halves agree
    assert float((old[0] - plain[0]).norm()) > 1e-4  # the unconditional half is rescaled too


def test_ren_mask_end_and_unknown_embeddings(bundle):
    m = get_mitigation("ren", mask_end=True)
    cond = m.encode(bundle, [PROMPTS[0]]).embeddings
    assert m.lengths_of(cond).tolist() == [OFFICIAL["ren"][PROMPTS[0]]["prompt_length"] - 1]
    assert m.lengths_of(cond + 1.0).tolist() == [cond.shape[1]]  # not from encode: nothing masked
