"""The planted testbed: memorization put into known weights, a ground truth for localization.

Start from the testbed's reference model (its U-Net never saw the memorized pairs), pick a small,
seeded, recorded set of cross-attention value neurons (output rows of attn2.to_v in the down and
mid blocks, NeMo's search space) and train only those rows on the memorized pairs (duplicated as
in the testbed) mixed with the unique pairs, until the memorized prompts replicate. Every other
weight is bit-identical to the reference model's, so whatever carries the copies is in the
planted rows. The folder is a testbed (model/, manifests/, clip/, testbed_card.json) plus
planted.json naming the rows, so every command takes it as --model.

What it shows: whether NeMo (and Wanda, which searches the feed-forward layers instead) finds
memorization where it is known to be localized. It is not a claim about SD v1.4.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memtrain.core.bundle import load_bundle
from memtrain.core.diffusion import images_to_latents
from memtrain.core.errors import MemtrainError
from memtrain.core.files import staged_dir
from memtrain.core.manifest import load_image, read_manifest
from memtrain.core.sampling import SAMPLER_FILE
from memtrain.core.text import encode_prompts
from memtrain.mitigations.nemo import value_layers
from memtrain.testbed.build import TestbedConfig, testbed_card
from memtrain.testbed.reference import ensure_reference_model
from memtrain.testbed.train_unet import TrainConfig, train_unet

PLANTED_FILE = "planted.json"


@dataclass
class PlantedConfig:
    """How the memorization is planted."""

    neurons_per_layer: int = 16  # of 256 rows in each of the testbed's 2 down/mid value layers
    steps: int = 1500
    lr: float = 3e-3
    batch_size: int = 16
    memorized_duplicates: int = 100  # as in the testbed (against 1 per unique pair)
    seed: int = 0


def planted_dir(testbed_root: str | Path) -> Path:
    return Path(testbed_root).parent / f"{Path(testbed_root).name}-planted"


def choose_neurons(layers: dict[str, torch.nn.Linear], per_layer: int, seed: int) -> dict[str, list[int]]:
    """A seeded random choice of `per_layer` output rows in each layer."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in layers.items():
        if per_layer > layer.out_features:
            raise MemtrainError(f"planted: {per_layer} neurons per layer, but '{name}' has {layer.out_features}")
        out[name] = sorted(torch.randperm(layer.out_features, generator=generator)[:per_layer].tolist())
    return out


def _train_rows_only(unet, neurons: dict[str, list[int]]) -> list:
    """Freeze the U-Net except the chosen rows (a gradient mask: Adam leaves zero-gradient rows as they are)."""
    unet.requires_grad_(False)
    modules = dict(unet.named_modules())
    handles = []
    for name, rows in neurons.items():
        weight = modules[name].weight
        weight.requires_grad_(True)
        mask = torch.zeros_like(weight)
        mask[rows] = 1.0
        handles.append(weight.register_hook(lambda grad, mask=mask: grad * mask))
    return handles


def build_planted(testbed_root: str | Path, output_dir: str | Path | None = None, config: PlantedConfig | None = None,
                  metric: str | None = None, progress: bool = True) -> dict:
    """Build (or reuse) the planted testbed next to a built testbed; returns its card."""
    from memtrain.metrics import get_descriptor

    cfg = config or PlantedConfig()
    root = Path(testbed_root)
    out = Path(output_dir) if output_dir else planted_dir(root)
    if (out / "testbed_card.json").is_file():
        return json.loads((out / "testbed_card.json").read_text())
    descriptor = get_descriptor(metric)
    start = time.time()
    reference = ensure_reference_model(root, progress=progress)
    bundle = load_bundle(reference)
    layers = value_layers(bundle.unet, "down_mid", str(reference))
    neurons = choose_neurons(layers, cfg.neurons_per_layer, cfg.seed)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    memorized = read_manifest(root / "manifests" / "memorized.jsonl", require_images=True)
    unique = read_manifest(root / "manifests" / "unique.jsonl", require_images=True)
    items = list(memorized) + list(unique)
    latents = images_to_latents(bundle, [load_image(it) for it in items])
    text = encode_prompts(bundle, [it.prompt for it in items]).embeddings
    uncond = encode_prompts(bundle, [""]).embeddings[0]
    index = torch.cat([torch.full((cfg.memorized_duplicates,), k) for k in range(len(memorized))]
                      + [torch.arange(len(memorized), len(items))])
    handles = _train_rows_only(bundle.unet, neurons)
    train = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=50, caption_dropout=0.1)
    try:
        ema = train_unet(bundle.unet, bundle.scheduler, latents, text, uncond, index, train, cfg.seed, progress=progress)
    finally:
        for h in handles:
            h.remove()
    bundle.unet = ema.to("cpu")
    changed = _changed_rows(bundle.unet, before)
    with staged_dir(out) as tmp:
        bundle.save(tmp / "model")
        shutil.copy(root / "model" / SAMPLER_FILE, tmp / "model" / SAMPLER_FILE)
        for sub in ("manifests", "images", "clip"):
            if (root / sub).exists():
                shutil.copytree(root / sub, tmp / sub)
        planted = {"layers": neurons, "n_planted": sum(len(v) for v in neurons.values()),
                   "rows_changed": changed, "config": asdict(cfg), "base_testbed": str(root.absolute()),
                   "start": "the testbed's reference model (never saw the memorized pairs)"}
        (tmp / PLANTED_FILE).write_text(json.dumps(planted, indent=1))
        card, grid = testbed_card(tmp / "model", tmp, TestbedConfig(), descriptor, progress=progress)
        grid.save(tmp / "grid.png")
        card = {"variant": "planted", "metric_backend": descriptor.name, "build_seconds": round(time.time() - start, 1),
                "planted": {k: planted[k] for k in ("n_planted", "rows_changed", "config")}, **card}
        (tmp / "testbed_card.json").write_text(json.dumps(card, indent=2))
    return card


def _changed_rows(unet, before: dict) -> dict[str, list[int]]:
    """Rows that differ from the reference model (must be exactly the planted ones)."""
    modules = dict(unet.named_modules())
    return {name: (modules[name].weight.detach() != w).any(dim=1).nonzero().flatten().tolist()
            for name, w in before.items()}
