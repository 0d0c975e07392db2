"""Memorization scores from descriptor embeddings (SPEC section 2).

Shapes: N inputs (prompts / embeddings), S seeds (generations per input), D descriptor dims.
All similarities are cosines; embeddings are re-normalized here so un-normalized inputs are safe.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MR_THRESHOLD = 0.7  # replication threshold of paper 004 (after Wen et al.)
PAPER002_THRESHOLD = 0.75  # paper 002: SSCD score >= 0.75 counts as memorized


def _as_array(x: Any, ndim: int, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def sscd_orig(gen_emb: Any, train_emb: Any) -> np.ndarray:
    """SSCD_Orig: cosine of each generation [N,S,D] with its input's training image [N,D] -> [N,S]."""
    gen = _as_array(gen_emb, 3, "gen_emb")
    train = _as_array(train_emb, 2, "train_emb")
    if gen.shape[0] != train.shape[0] or gen.shape[2] != train.shape[1]:
        raise ValueError(f"gen_emb {gen.shape} and train_emb {train.shape} disagree: need [N,S,D] and [N,D]")
    return np.einsum("nsd,nd->ns", _unit(gen), _unit(train))


def sscd_cross(gen_emb: Any, train_emb: Any) -> np.ndarray:
    """Cosine of every generation [N,S,D] with every training image [M,D] -> [N,S,M] (is a
    generation a copy of any image of the set, not only of its own input's?)."""
    gen = _as_array(gen_emb, 3, "gen_emb")
    train = _as_array(train_emb, 2, "train_emb")
    if gen.shape[2] != train.shape[1]:
        raise ValueError(f"gen_emb {gen.shape} and train_emb {train.shape} disagree on the embedding size")
    return np.einsum("nsd,md->nsm", _unit(gen), _unit(train))


def sscd_gen(gen_emb: Any, ref_gen_emb: Any) -> np.ndarray:
    """SSCD_Gen: cosine of each generation with the unmitigated model's generation for the same
    input and seed. Both [N,S,D] with matching seeds -> [N,S]."""
    gen = _as_array(gen_emb, 3, "gen_emb")
    ref = _as_array(ref_gen_emb, 3, "ref_gen_emb")
    if gen.shape != ref.shape:
        raise ValueError(f"gen_emb {gen.shape} and ref_gen_emb {ref.shape} must have the same [N,S,D] shape")
    return np.einsum("nsd,nsd->ns", _unit(gen), _unit(ref))


def pairwise_cosine(gen_emb: Any) -> np.ndarray:
    """[N,S,D] -> [N,S,S] cosine between the seeds of each input."""
    gen = _unit(_as_array(gen_emb, 3, "gen_emb"))
    return np.einsum("nsd,ntd->nst", gen, gen)


def _offdiag_mean(sims: np.ndarray) -> np.ndarray:
    """Mean over i != j of [N,S,S] -> [N]; S >= 2."""
    s = sims.shape[-1]
    if s < 2:
        raise ValueError(f"need at least 2 seeds per input for pairwise similarity, got {s}")
    total = sims.sum(axis=(1, 2)) - np.trace(sims, axis1=1, axis2=2)
    return total / (s * (s - 1))


def diversity_dsscd(gen_emb: Any) -> np.ndarray:
    """D_SSCD: mean pairwise cosine between the seeds of each input (self-pairs excluded) -> [N].
    High = the seeds agree (low diversity)."""
    return _offdiag_mean(pairwise_cosine(gen_emb))


def _check_sscd(sscd: Any) -> np.ndarray:
    arr = _as_array(sscd, 2, "sscd")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"sscd must be [N,S] with N, S >= 1, got {arr.shape}")
    return arr


def memorization_rate(sscd: Any, threshold: float = MR_THRESHOLD) -> float:
    """MR: fraction of inputs whose max over seeds of SSCD [N,S] is > threshold."""
    arr = _check_sscd(sscd)
    return float(np.mean(arr.max(axis=1) > threshold))


def _gen_mean_from(gen_pairwise: Any, n: int, s: int) -> np.ndarray:
    """Accept [N] mean pairwise scores or [N,S,S] pairwise-similarity matrices; return [N]."""
    arr = np.asarray(gen_pairwise, dtype=np.float64)
    if arr.ndim == 1:
        if arr.shape[0] != n:
            raise ValueError(f"gen_pairwise has {arr.shape[0]} inputs, train_sim has {n}")
        return arr
    if arr.ndim == 3 and arr.shape == (n, s, s):
        # Guard against passing embeddings [N,S,D] with D == S: a similarity matrix is symmetric
        # with a unit diagonal.
        diag = np.diagonal(arr, axis1=1, axis2=2)
        if not (np.allclose(arr, arr.transpose(0, 2, 1), atol=1e-5) and np.allclose(diag, 1.0, atol=1e-4)):
            raise ValueError("gen_pairwise [N,S,S] must be cosine matrices (symmetric, unit diagonal)")
        return _offdiag_mean(arr)
    raise ValueError(
        f"gen_pairwise must be [N] (e.g. diversity_dsscd(gen_emb)) or [N,S,S] = ({n},{s},{s}), got {arr.shape}"
    )


def paper002_score(train_sim: Any, gen_pairwise: Any, threshold: float = PAPER002_THRESHOLD) -> dict[str, Any]:
    """Paper 002's memorization score (its Eq. 9).

    For each generated sample: score = (SSCD_train + SSCD_generate) / 2, where SSCD_train is the
    sample's SSCD to its paired training image and SSCD_generate is the mean SSCD over all
    C(S,2) pairs of the S generations of the same prompt (shared by that prompt's samples).
    A generated sample is memorized if score >= threshold (0.75).

    train_sim: [N,S] SSCD_train; gen_pairwise: [N] mean pairwise (diversity_dsscd) or [N,S,S].
    Returns per-sample `score`/`memorized` [N,S], per-input `sscd_generate` [N] and
    `input_max_score` [N], `sample_rate` (fraction of samples memorized) and `input_rate`
    (fraction of inputs with at least one memorized sample).
    """
    train = _check_sscd(train_sim)
    n, s = train.shape
    gen_mean = _gen_mean_from(gen_pairwise, n, s)
    score = (train + gen_mean[:, None]) / 2.0
    memorized = score >= threshold
    return {
        "score": score,
        "memorized": memorized,
        "sscd_train": train,
        "sscd_generate": gen_mean,
        "input_max_score": score.max(axis=1),
        "sample_rate": float(memorized.mean()),
        "input_rate": float(memorized.any(axis=1).mean()),
        "threshold": threshold,
    }


def summarize(sscd: Any, threshold: float = MR_THRESHOLD) -> dict[str, Any]:
    """Per-input max and median over seeds; across inputs median/mean/std (ddof=0) of the
    per-input max, the median of per-input medians, and MR. JSON-ready (lists and floats)."""
    arr = _check_sscd(sscd)
    per_max = arr.max(axis=1)
    per_median = np.median(arr, axis=1)
    return {
        "mr": float(np.mean(per_max > threshold)),
        "sscd_orig_median": float(np.median(per_max)),
        "sscd_orig_mean": float(np.mean(per_max)),
        "sscd_orig_std": float(np.std(per_max)),
        "median_of_medians": float(np.median(per_median)),
        "per_input_max": per_max.tolist(),
        "per_input_median": per_median.tolist(),
        "n_inputs": int(arr.shape[0]),
        "n_seeds": int(arr.shape[1]),
        "threshold": threshold,
    }
