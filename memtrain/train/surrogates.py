"""Surrogate images (paper 004 Sec. 4.4, App. I.2): content of a memorized prompt, not its pixels.

K images per memorized prompt are generated under an active mitigation (NeMo by default, any
registered one works) or by a second model that never saw the images. Any surrogate whose
SSCD against its own training image, or against any other memorized image, exceeds the drop
threshold is itself a copy and is dropped (a mitigated model often swaps one memorized image
for another; training towards that one would re-memorize it). The kept images are cached under
output_dir/surrogates with a manifest (and the settings that made them, so a changed recipe
regenerates them instead of reusing stale ones).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from memtrain.core.bundle import load_bundle
from memtrain.core.run import gather_in_order, is_main, shard, shard_chunks, wait
from memtrain.core.errors import MemtrainError
from memtrain.core.manifest import ManifestItem, load_image, read_manifest, write_manifest
from memtrain.core.report import to_pil
from memtrain.core.sampling import sample
from memtrain.metrics import get_descriptor, sscd_cross, sscd_orig
from memtrain.mitigations import applied, get_mitigation
from memtrain.train.recipe import SurrogateSpec

log = logging.getLogger(__name__)
SETTINGS_FILE = "settings.json"
EMBED_CHUNK = 16  # training images per descriptor call


def descriptor_for(spec: str, device=None):
    """The copy descriptor a recipe names ('standin' opts into the stand-in), on `device` where
    its backend can run there."""
    # naming the stand-in in a recipe is the explicit opt-in get_descriptor asks for
    return get_descriptor(spec, allow_standin=str(spec).lower().startswith("standin"), device=device)


def _generator(bundle, spec: SurrogateSpec, prompts: list[str], reference_prompts: list[str],
               seeds: list[int], accelerator=None, dtype: torch.dtype = torch.float32):
    """prompt -> (K, 3, H, W) images in [0, 1]: under the spec's mitigation (prepared once, its
    per-prompt work spread over the processes) or from the spec's second model."""
    if spec.source != "mitigation":
        other = load_bundle(spec.model, device=bundle.device, dtype=dtype)
        settings = other.sampler_settings.with_overrides(spec.sampler)
        return lambda prompt: sample(other, [prompt], seeds, settings).images[0]
    mitigation = get_mitigation(spec.mitigation, **spec.mitigation_settings).spread_over(accelerator)
    mitigation.prepare(bundle, prompts, reference_prompts, seeds)
    settings = bundle.sampler_settings.with_overrides(spec.sampler)

    def generate(prompt: str) -> torch.Tensor:
        m = mitigation.for_prompts([prompt])
        with applied(m, bundle):
            cond = m.encode(bundle, [prompt]).embeddings
            return sample(bundle, cond, seeds, settings, **m.sampling_kwargs(bundle, settings)).images[0]

    return generate


def _settings_key(spec: SurrogateSpec, model: str, memorized: Sequence[ManifestItem]) -> dict:
    return {"spec": asdict(spec), "model": str(model), "items": [(m.id, m.prompt) for m in memorized]}


def load_cached(folder: Path, key: dict) -> list[ManifestItem] | None:
    """Surrogates cached in `folder` if they were made with these settings, else None."""
    settings, manifest = folder / SETTINGS_FILE, folder / "manifest.jsonl"
    if not (settings.is_file() and manifest.is_file()):
        return None
    if json.loads(settings.read_text()) != json.loads(json.dumps(key)):
        log.info("surrogate cache in %s was made with other settings: regenerating", folder)
        return None
    return list(read_manifest(manifest, require_images=True, strict=True))


def build_surrogates(bundle, spec: SurrogateSpec, memorized: Sequence[ManifestItem], folder: Path,
                     model_name: str = "", reference_prompts: Sequence[str] = (),
                     dtype: torch.dtype = torch.float32, accelerator=None,
                     work: Counter | None = None) -> list[ManifestItem]:
    """Generate, filter by SSCD_Orig and cache surrogates; returns the kept items, each with
    extra['memorized_id'] and extra['sscd_orig']. Reuses a cache made with the same settings.
    `dtype`: the surrogate model's precision (source: model; the fine-tuner's frozen dtype).

    Collective: every process generates and scores its share of the prompts (one prompt at a
    time, so the images do not depend on the number of processes) and saves its images; the
    main process writes the manifest. `work` counts this process's prompts."""
    folder = Path(folder)
    key = _settings_key(spec, model_name, memorized)
    cached = load_cached(folder, key)
    if cached is not None:
        return cached
    prompts = [m.prompt for m in memorized]
    seeds = [spec.seed + k for k in range(spec.per_prompt)]
    descriptor = descriptor_for(spec.descriptor, bundle.device)
    # every image is checked against every memorized image: their embeddings, gathered
    train_local = [(chunk[0][0], descriptor.embed([load_image(m) for _, m in chunk]))
                   for chunk in shard_chunks(memorized, EMBED_CHUNK, accelerator)]
    train_emb = np.concatenate(gather_in_order(train_local, accelerator))
    generate = _generator(bundle, spec, prompts, list(reference_prompts), seeds, accelerator, dtype)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    local = []
    for i, item in shard(memorized, accelerator):
        gen_emb = descriptor.embed(images := generate(item.prompt))  # (K, D), one prompt per call
        own = np.asarray(sscd_orig(gen_emb[None], train_emb[i : i + 1]))[0]  # (K,) against its own image
        worst = sscd_cross(gen_emb[None], train_emb).max(-1)[0]  # (K,) against any memorized image
        kept = []
        for k, seed in enumerate(seeds):
            if float(worst[k]) > spec.sscd_drop_threshold:
                continue  # a copy of a memorized image: training towards it would re-memorize
            path = folder / "images" / f"{item.id}_s{seed}.png"
            to_pil(images[k]).save(path)
            kept.append(ManifestItem(id=f"{item.id}_s{seed}", prompt=item.prompt, image=str(path),
                                     label="surrogate", source=spec.source,
                                     extra={"memorized_id": item.id, "sscd_orig": round(float(own[k]), 4),
                                            "sscd_max_memorized": round(float(worst[k]), 4)}))
        local.append((i, (kept, float(worst.min()))))
        if work is not None:
            work["surrogates/prompts"] += 1
    results = gather_in_order(local, accelerator)
    kept = [k for items, _ in results for k in items]
    if not kept:
        raise MemtrainError(
            f"no usable surrogates: all {len(memorized) * len(seeds)} generated images have SSCD > "
            f"{spec.sscd_drop_threshold} with a memorized image (lowest {min(w for _, w in results):.2f}); use a "
            "stronger mitigation, another surrogates.model, or more surrogates.per_prompt"
        )
    missing = sorted({m.id for m in memorized} - {k.extra["memorized_id"] for k in kept})
    if missing:
        log.warning("no usable surrogate for %d memorized items (skipped in training): %s",
                    len(missing), ", ".join(missing))
    if is_main(accelerator):
        write_manifest(folder / "manifest.jsonl", kept)
        (folder / SETTINGS_FILE).write_text(json.dumps(key, indent=1))
    wait(accelerator)
    log.info("surrogates: kept %d of %d (SSCD with every memorized image <= %.2f)",
             len(kept), len(memorized) * len(seeds), spec.sscd_drop_threshold)
    return kept
