"""What the removal methods generate before training: images of the original model from a prompt,
scored against a memorized image by the copy descriptor (Concept Ablation's anchor images, SISS's
replicas and non-replicas). Each prompt's images are cached in a folder with the settings that
made them, so a resumed run reuses them and a changed recipe makes them anew."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memtrain.core.manifest import ManifestItem, load_image
from memtrain.core.report import to_pil
from memtrain.core.sampling import SamplerSettings, sample
from memtrain.metrics import sscd_orig

SCORES_FILE = "scores.json"


@dataclass
class Generated:
    """One generation: its prompt, seed, image file and SSCD against the memorized image."""

    prompt: str
    seed: int
    path: str
    sscd: float


def load_image_file(path: str):
    """A generated image file as an RGB PIL image (load_image's checks and errors)."""
    return load_image(ManifestItem(id=str(path), prompt="", image=str(path)))


def safe_name(item_id: str) -> str:
    """An item id as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(item_id)) or "item"


def generate_scored(bundle, descriptor, item: ManifestItem, prompt: str, seeds: list[int],
                    settings: SamplerSettings, folder: Path) -> list[Generated]:
    """len(seeds) images of `prompt` from `bundle` (the original model) in `folder`, each with its
    SSCD against `item`'s image; reused when `folder` holds the same prompt, seeds and sampler."""
    key = {"prompt": prompt, "seeds": list(seeds), "sampler": settings.to_dict(), "descriptor": descriptor.name,
           "memorized": item.id}
    cache = folder / SCORES_FILE
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key and all(Path(g["path"]).is_file() for g in saved["generated"]):
            return [Generated(**g) for g in saved["generated"]]
    folder.mkdir(parents=True, exist_ok=True)
    images = sample(bundle, [prompt], seeds, settings).images[0]  # (S, 3, H, W) in [0, 1]
    reference = descriptor.embed([load_image(item)])
    scores = np.asarray(sscd_orig(descriptor.embed(images)[None], reference))[0]
    out = []
    for k, seed in enumerate(seeds):
        path = folder / f"s{seed}.png"
        to_pil(images[k]).save(path)
        out.append(Generated(prompt, int(seed), str(path), round(float(scores[k]), 4)))
    cache.write_text(json.dumps({"key": key, "generated": [g.__dict__ for g in out]}, indent=1))
    return out
