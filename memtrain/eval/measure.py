"""Generate from a set of inputs and score the images against their training images.

The one path every figure goes through: the testbed card, evaluate, the audit and the
trainer's epoch-end check all call `measure`, so they agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from memtrain.core.errors import MemtrainError
from memtrain.metrics import diversity_dsscd, sscd_gen, sscd_orig, summarize
from memtrain.core.sampling import SampleOutput, SamplerSettings, check_seeds, sample
from memtrain.core.text import TextEmbedding

@dataclass
class Measurement:
    """Scores for N inputs x S seeds."""

    sscd_orig: np.ndarray | None  # (N, S), None when no training images were given
    gen_embeddings: np.ndarray  # (N, S, D)
    images: torch.Tensor  # (N, S, 3, H, W) in [0, 1]
    sscd_gen: np.ndarray | None = None  # (N, S) against reference generations
    extra: dict = field(default_factory=dict)

    def figures(self, threshold: float = 0.7) -> dict:
        """JSON-ready overall figures (the keys the card and metrics.json share)."""
        out: dict = {"n": int(self.gen_embeddings.shape[0])}
        if self.gen_embeddings.shape[1] > 1:
            out["d_sscd"] = float(np.mean(diversity_dsscd(self.gen_embeddings)))
        if self.sscd_orig is not None:
            s = summarize(self.sscd_orig, threshold=threshold)
            out.update(
                mr=s["mr"], median_sscd=s["median_of_medians"], sscd_orig_median=s["sscd_orig_median"],
                sscd_orig_mean=s["sscd_orig_mean"], sscd_orig_std=s["sscd_orig_std"],
            )
        if self.sscd_gen is not None:
            out["sscd_gen_median"] = float(np.median(self.sscd_gen.max(axis=1)))
            out["sscd_gen_mean"] = float(np.mean(self.sscd_gen.max(axis=1)))
        return out

    def per_item(self, ids: Sequence[str]) -> list[dict]:
        rows = []
        div = diversity_dsscd(self.gen_embeddings) if self.gen_embeddings.shape[1] > 1 else None
        for k, item_id in enumerate(ids):
            row: dict = {"id": item_id}
            if self.sscd_orig is not None:
                row["sscd_orig_max"] = float(self.sscd_orig[k].max())
                row["sscd_orig_median"] = float(np.median(self.sscd_orig[k]))
                row["sscd_orig"] = [round(float(v), 4) for v in self.sscd_orig[k]]
            if self.sscd_gen is not None:
                row["sscd_gen_max"] = float(self.sscd_gen[k].max())
            if div is not None:
                row["d_sscd"] = float(div[k])
            rows.append(row)
        return rows


def embed_generations(descriptor, images: torch.Tensor) -> np.ndarray:
    """(N, S, 3, H, W) images -> (N, S, D) copy-descriptor embeddings."""
    n, s = images.shape[:2]
    return descriptor.embed(images.flatten(0, 1)).reshape(n, s, -1)


def measure(
    bundle,
    cond: Sequence[str] | TextEmbedding | torch.Tensor,
    seeds: Sequence[int],
    descriptor,
    settings: SamplerSettings,
    train_images: Sequence | None = None,
    reference_embeddings: np.ndarray | None = None,
    uncond: torch.Tensor | None = None,
    unet_forward=None,
    hook=None,
    progress: bool = False,
) -> Measurement:
    """Sample len(cond) x len(seeds) images and score them (SSCD_Orig vs train_images,
    SSCD_Gen vs reference generation embeddings of the same inputs and seeds, D_SSCD)."""
    seeds = check_seeds(seeds)
    out: SampleOutput = sample(bundle, cond, seeds, settings, uncond=uncond, hook=hook,
                               unet_forward=unet_forward, progress=progress)
    gen = embed_generations(descriptor, out.images)
    orig = None
    if train_images is not None:
        if len(train_images) != gen.shape[0]:
            raise MemtrainError(f"{len(train_images)} training images for {gen.shape[0]} inputs")
        orig = sscd_orig(gen, descriptor.embed(list(train_images)))
    ref = sscd_gen(gen, reference_embeddings) if reference_embeddings is not None else None
    return Measurement(sscd_orig=orig, gen_embeddings=gen, images=out.images, sscd_gen=ref)
