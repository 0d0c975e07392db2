"""Score functions on small hand-checkable arrays; A_CLIP / LPIPS degrade without weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memtrain.metrics import (
    ClipScorer,
    MetricBackendError,
    clipscore_from_cosine,
    diversity_dsscd,
    get_alignment_scorer,
    lpips_diversity,
    memorization_rate,
    not_computed,
    pairwise_cosine,
    paper002_score,
    sscd_cross,
    sscd_gen,
    sscd_orig,
    summarize,
)

E = np.eye(3)  # three orthonormal unit "descriptors"


def unit(*v: float) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def test_sscd_orig_hand_values():
    train = np.stack([E[0], E[1]])  # [N=2, D=3]
    gen = np.stack([
        [E[0], E[1], unit(1, 1, 0)],  # input 0: exact copy, orthogonal, 45 degrees
        [E[2], -E[1], E[1] * 5.0],  # input 1: orthogonal, opposite, un-normalized copy
    ])
    np.testing.assert_allclose(sscd_orig(gen, train), [[1, 0, np.sqrt(0.5)], [0, -1, 1]], atol=1e-12)


def test_sscd_cross_scores_every_training_image():
    train = np.stack([E[0], E[1]])  # [M=2, D=3]
    gen = np.stack([[E[1], unit(1, 1, 0) * 3.0]])  # one input, two seeds: a copy of image 1, a blend
    cross = sscd_cross(gen, train)
    assert cross.shape == (1, 2, 2)
    np.testing.assert_allclose(cross, [[[0, 1], [np.sqrt(0.5), np.sqrt(0.5)]]], atol=1e-12)
    # its own image (row 0) alone would miss that seed 0 copies another memorized image
    np.testing.assert_allclose(sscd_orig(gen, train[:1]), [[0, np.sqrt(0.5)]], atol=1e-12)


def test_sscd_gen_pairs_same_seed():
    gen = np.stack([[E[0], E[1]]])
    ref = np.stack([[E[0], E[0]]])
    np.testing.assert_allclose(sscd_gen(gen, ref), [[1.0, 0.0]])


def test_diversity_excludes_self_pairs():
    gen = np.stack([
        [E[0], E[0], E[0]],  # all identical -> 1
        [E[0], E[1], E[2]],  # all orthogonal -> 0
        [E[0], E[0], E[1]],  # pairs (0,1)=1, (0,2)=0, (1,2)=0 -> 1/3
    ])
    np.testing.assert_allclose(diversity_dsscd(gen), [1.0, 0.0, 1 / 3], atol=1e-12)
    assert pairwise_cosine(gen).shape == (3, 3, 3)


def test_memorization_rate_uses_max_over_seeds_strictly():
    sscd = np.array([[0.1, 0.71], [0.7, 0.7], [0.9, 0.2], [0.0, 0.0]])
    assert memorization_rate(sscd) == pytest.approx(0.5)  # 0.7 itself is not > 0.7
    assert memorization_rate(sscd, threshold=0.5) == pytest.approx(0.75)


def test_summarize_hand_values():
    sscd = np.array([[0.2, 0.8, 0.5], [0.1, 0.3, 0.2], [0.9, 0.95, 0.6]])
    s = summarize(sscd)
    assert s["per_input_max"] == pytest.approx([0.8, 0.3, 0.95])
    assert s["per_input_median"] == pytest.approx([0.5, 0.2, 0.9])
    assert s["mr"] == pytest.approx(2 / 3)
    assert s["sscd_orig_median"] == pytest.approx(0.8)
    assert s["sscd_orig_mean"] == pytest.approx((0.8 + 0.3 + 0.95) / 3)
    assert s["sscd_orig_std"] == pytest.approx(np.std([0.8, 0.3, 0.95]))
    assert s["median_of_medians"] == pytest.approx(0.5)
    json.dumps(s)  # report-ready


def test_paper002_score_eq9():
    train = np.array([[1.0, 0.6], [0.2, 0.2]])
    gen_mean = np.array([0.5, 0.9])
    r = paper002_score(train, gen_mean)
    np.testing.assert_allclose(r["score"], [[0.75, 0.55], [0.55, 0.55]])
    np.testing.assert_array_equal(r["memorized"], [[True, False], [False, False]])  # >= 0.75
    assert r["sample_rate"] == pytest.approx(0.25)
    assert r["input_rate"] == pytest.approx(0.5)


def test_paper002_accepts_pairwise_matrices_and_matches_embeddings():
    gen = np.stack([[E[0], E[0], E[1]], [E[0], E[1], E[2]]])
    train = sscd_orig(gen, np.stack([E[0], E[0]]))
    from_mat = paper002_score(train, pairwise_cosine(gen))
    from_vec = paper002_score(train, diversity_dsscd(gen))
    np.testing.assert_allclose(from_mat["score"], from_vec["score"])
    np.testing.assert_allclose(from_vec["sscd_generate"], [1 / 3, 0.0])
    with pytest.raises(ValueError, match="cosine matrices"):
        paper002_score(train, np.ones((2, 3, 3)) * 0.5)  # not a similarity matrix (diag != 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda: sscd_orig(np.zeros((2, 3, 4)), np.zeros((3, 4))),
        lambda: sscd_orig(np.zeros((2, 4)), np.zeros((2, 4))),
        lambda: sscd_gen(np.zeros((2, 3, 4)), np.zeros((2, 2, 4))),
        lambda: diversity_dsscd(np.ones((2, 1, 4))),
        lambda: memorization_rate(np.zeros(5)),
        lambda: summarize(np.array([[np.nan, 0.1]])),
        lambda: paper002_score(np.zeros((2, 3)), np.zeros(3)),
    ],
)
def test_shape_errors(call):
    with pytest.raises(ValueError):
        call()


def test_clipscore_convention():
    np.testing.assert_allclose(clipscore_from_cosine([0.3, -0.2]), [30.0, 0.0])


def test_clip_scorer_without_weights(tmp_path):
    with pytest.raises(MetricBackendError, match="not found"):
        ClipScorer(tmp_path / "no-clip-here")
    with pytest.raises(MetricBackendError, match="cannot load CLIP"):
        ClipScorer(tmp_path)  # exists but holds no model
    with pytest.raises(MetricBackendError, match="not computed"):
        get_alignment_scorer(None)


def test_lpips_without_weights_and_not_computed():
    with pytest.raises(MetricBackendError, match="no LPIPS weights"):
        lpips_diversity([np.zeros((2, 8, 8, 3), np.uint8)])
    assert not_computed("no weights") == {"value": None, "status": "not computed", "reason": "no weights"}


def test_lpips_with_user_torchscript(tmp_path):
    import torch

    class MeanAbs(torch.nn.Module):
        # A stand-in distance with LPIPS's call convention: f(x0, x1) in [-1, 1] -> [B,1,1,1].
        def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
            return (x0 - x1).abs().mean(dim=(1, 2, 3), keepdim=True)

    path = tmp_path / "meanabs.pt"
    torch.jit.script(MeanAbs()).save(str(path))
    black, white = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)
    # Input 0: pairs (b,b)=0, (b,w)=2, (b,w)=2 -> 4/3; input 1: two identical -> 0.
    out = lpips_diversity([np.stack([black, black, white]), np.stack([white, white])], weights_path=path)
    np.testing.assert_allclose(out, [4 / 3, 0.0], atol=1e-6)


def _tiny_clip_folder(path) -> None:
    """A random-weight CLIP (transformers) with a byte-level vocab: exercises the real loading
    and scoring path; the numbers mean nothing."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(str(path), model_max_length=16, pad_token="<|endoftext|>")
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    n = len(vocab)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(path))
    proc.save_pretrained(str(path))


def test_clip_scorer_pairs_image_i_with_text_i(tmp_path):
    import torch

    folder = tmp_path / "tiny-clip"
    _tiny_clip_folder(folder)
    scorer = ClipScorer(folder, batch_size=2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    texts = ["a cat", "an astronaut", "red coffee cup"]
    cos = scorer.score(images, texts)
    # Reference: the model's own logits, divided by its temperature, on the diagonal.
    inputs = scorer.processor(text=texts, images=list(images), return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = scorer.model(**inputs)
        ref = (out.logits_per_image / scorer.model.logit_scale.exp()).diagonal().numpy()
    assert cos.shape == (3,) and np.all(np.abs(cos) <= 1)
    np.testing.assert_allclose(cos, ref, atol=1e-5)
    np.testing.assert_allclose(scorer.clipscore(images, texts), 100 * np.maximum(cos, 0))
