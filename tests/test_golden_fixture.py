"""The golden fixture rebuilds as the official runs had it (source: tests/golden/official.json,
`fixture.checks`, measured with the official code's environment; see docs/fidelity.md)."""

import numpy as np
import torch

from golden_fixture import FIXTURE, PROMPTS, latent, nemo_latents

CHECKS = FIXTURE["checks"]


def test_latents_and_tokens_match_the_official_runs(golden):
    assert np.allclose(latent(0)[0, 0, :4], CHECKS["latent(0)[0,0,:4]"], rtol=1e-5, atol=0)
    assert np.allclose(latent(1)[3, 15, 12:16], CHECKS["latent(1)[3,15,12:16]"], rtol=1e-5, atol=0)
    assert np.allclose(nemo_latents()[0, 0, 0, :4], CHECKS["nemo_latents[0,0,0,:4]"], rtol=1e-5, atol=0)
    for prompt in PROMPTS:
        assert golden.tokenizer(prompt, truncation=True).input_ids == FIXTURE["token_ids_unpadded"][prompt]


def test_embeddings_and_unet_output_match_the_official_runs(golden):
    for prompt, norm in CHECKS["embedding_norm_per_prompt"].items():
        assert np.isclose(float(golden.embed([prompt]).norm()), norm, rtol=1e-5), prompt
    e = golden.embed([PROMPTS[0]])
    assert np.allclose(e[0, 0, :4], CHECKS["embedding[P0][0,:4]"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        out = golden.unet(latent(0)[None], 981, e).sample
    assert np.isclose(float(out.norm()), CHECKS["unet(latent(0)[None], 981, embedding[P0]).norm"], rtol=1e-5)
    assert np.allclose(out[0, 3, 15, 12:16], CHECKS["unet(latent(0)[None], 981, embedding[P0])[0,3,15,12:16]"],
                       rtol=1e-5, atol=1e-6)
