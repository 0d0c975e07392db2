"""The planted testbed: memorization gated by known neurons, a ground truth for localization.

Start from the testbed's reference model (its U-Net never saw the memorized pairs), pick a small,
seeded, recorded set of cross-attention value neurons (output rows of attn2.to_v in the down and
mid blocks, NeMo's search space) and fine-tune on the memorized pairs (duplicated as in the
testbed) mixed with the unique pairs, with two rules:
- of the value projections only the planted rows train (the other rows keep the reference
  model's weights, so their activations stay those of a model that never saw the images);
- every memorized sample is also trained with the planted rows zeroed, towards what the reference
  model generates for that prompt: without the planted neurons, no copy.
Measured first (docs/measurements.md): training only the planted rows (even 64 per layer in all
four value layers, plus feed-forward rows) never made the frozen reference U-Net replicate
(SSCD_Orig <= 0.16 after 2,000 steps): a frozen U-Net cannot be steered to an image it never
learned through its text path alone. So the image content is in the fine-tuned weights
everywhere, and what is local, by construction, is the trigger: the planted rows are necessary
for the copies. The folder is a testbed (model/, manifests/, clip/, testbed_card.json) plus
planted.json naming the rows, so every command takes it as --model.

What it shows: whether NeMo (and Wanda, which searches the feed-forward layers instead) finds
memorization where it is known to be gated, and whether pruning those neurons removes the images
or only the trigger (the audit's attack answers that). It is not a claim about SD v1.4.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from memtrain.core.bundle import load_bundle
from memtrain.core.diffusion import images_to_latents
from memtrain.core.errors import MemtrainError
from memtrain.core.files import staged_dir
from memtrain.core.report import versioned
from memtrain.core.manifest import load_image, read_manifest, write_manifest
from memtrain.core.sampling import SAMPLER_FILE, sample
from memtrain.core.text import encode_prompts
from memtrain.metrics import get_descriptor
from memtrain.mitigations.nemo_neurons import blocked_neurons, value_layers
from memtrain.testbed.build import TestbedConfig, build_or_reuse, default_testbed_dir, testbed_card
from memtrain.testbed.reference import ensure_reference_model

PLANTED_FILE = "planted.json"


@dataclass
class PlantedConfig:
    """How the memorization is planted."""

    neurons_per_layer: int = 16  # of 256 rows in each of the testbed's 2 down/mid value layers
    n_memorized: int = 4  # the first N memorized pairs of the base testbed
    steps: int = 1200  # measured: 3 of 4 replicate after 600 steps, none once the planted rows are zeroed
    lr: float = 1e-3
    batch_size: int = 16
    memorized_duplicates: int = 100  # as in the testbed (against 1 per unique pair)
    seed: int = 0
    reference_steps: int = 600  # the base testbed's reference model, trained first if missing


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


def _freeze_other_value_rows(layers: dict[str, torch.nn.Linear], neurons: dict[str, list[int]]) -> list:
    """Gradient masks: of each value projection only the planted rows train (Adam leaves a row
    whose gradient is always zero exactly where it was)."""
    handles = []
    for name, layer in layers.items():
        mask = torch.zeros_like(layer.weight)
        mask[neurons[name]] = 1.0
        handles.append(layer.weight.register_hook(lambda grad, mask=mask: grad * mask))
    return handles


def train_planted(bundle, layers, neurons, latents, text, uncond, substitutes, n_memorized: int,
                  cfg: PlantedConfig, progress: bool = True):
    """Fine-tune the U-Net (in place) with the gated objective; returns its EMA copy.

    Rows 0..n_memorized-1 of latents/text are the memorized pairs; `substitutes` (n_memorized, ...)
    are the latents the reference model generates for their prompts (the target when the planted
    rows are zeroed)."""
    from tqdm.auto import tqdm

    torch.set_flush_denormal(True)  # Adam's second moments drift into denormals (slow on CPU)
    unet = bundle.unet.train().requires_grad_(True)
    noise_scheduler = DDPMScheduler.from_config(bundle.scheduler.config)
    velocity = noise_scheduler.config.prediction_type == "v_prediction"
    target_of = lambda x0, noise, t: noise_scheduler.get_velocity(x0, noise, t) if velocity else noise  # noqa: E731
    handles = _freeze_other_value_rows(layers, neurons)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    index = torch.cat([torch.full((cfg.memorized_duplicates,), k) for k in range(n_memorized)]
                      + [torch.arange(n_memorized, len(latents))])
    try:
        for step in tqdm(range(cfg.steps), desc="planting", disable=not progress):
            pick = index[torch.randint(len(index), (cfg.batch_size,), generator=generator)]
            y = text[pick].clone()
            drop = torch.rand(cfg.batch_size, generator=generator) < 0.1
            y[drop] = uncond
            noise = torch.randn(latents[pick].shape, generator=generator)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
            x0 = latents[pick]
            loss = F.mse_loss(unet(noise_scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=y).sample,
                              target_of(x0, noise, t))
            gated = (pick < n_memorized) & ~drop
            if gated.any():  # the same prompts without the planted neurons: the reference model's image
                x1, n1, t1 = substitutes[pick[gated]], noise[gated], t[gated]
                with blocked_neurons(layers, neurons):
                    out = unet(noise_scheduler.add_noise(x1, n1, t1), t1, encoder_hidden_states=y[gated]).sample
                loss = loss + F.mse_loss(out, target_of(x1, n1, t1))
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / 50)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                decay = min(0.995, (1 + step) / (10 + step))
                for p_ema, p in zip(ema.parameters(), unet.parameters()):
                    p_ema.lerp_(p, 1 - decay)
    finally:
        for h in handles:
            h.remove()
    return ema


def build_planted(testbed_root: str | Path, output_dir: str | Path | None = None, config: PlantedConfig | None = None,
                  metric: str | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Build (or reuse, unless overwrite) the planted testbed next to a built testbed; returns its card."""
    cfg = config or PlantedConfig()
    root = Path(testbed_root)
    out = Path(output_dir) if output_dir else planted_dir(root)
    if (out / "testbed_card.json").is_file() and not overwrite:
        return json.loads((out / "testbed_card.json").read_text())
    descriptor = get_descriptor(metric)
    start = time.time()
    reference = ensure_reference_model(root, steps=cfg.reference_steps, progress=progress)
    bundle = load_bundle(reference)
    torch.manual_seed(cfg.seed)
    layers = value_layers(bundle.unet, "down_mid", str(reference))
    neurons = choose_neurons(layers, cfg.neurons_per_layer, cfg.seed)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    memorized = list(read_manifest(root / "manifests" / "memorized.jsonl", require_images=True))[: cfg.n_memorized]
    unique = read_manifest(root / "manifests" / "unique.jsonl", require_images=True)
    items = memorized + list(unique)
    latents = images_to_latents(bundle, [load_image(it) for it in items])
    text = encode_prompts(bundle, [it.prompt for it in items]).embeddings
    uncond = encode_prompts(bundle, [""]).embeddings[0]
    substitutes = sample(bundle, [it.prompt for it in memorized], [cfg.seed], bundle.sampler_settings).latents[:, 0]
    ema = train_planted(bundle, layers, neurons, latents, text, uncond, substitutes, len(memorized), cfg, progress)
    bundle.unet = ema.to("cpu")
    changed = _changed_rows(bundle.unet, before)
    with staged_dir(out) as tmp:
        bundle.save(tmp / "model")
        shutil.copy(root / "model" / SAMPLER_FILE, tmp / "model" / SAMPLER_FILE)
        for sub in ("images", "clip"):
            if (root / sub).exists():
                shutil.copytree(root / sub, tmp / sub)
        shutil.copytree(root / "manifests", tmp / "manifests")
        write_manifest(tmp / "manifests" / "memorized.jsonl", memorized)  # only the planted ones
        planted = {"layers": neurons, "n_planted": sum(len(v) for v in neurons.values()),
                   "value_rows_changed": changed, "memorized": [it.id for it in memorized],
                   "config": asdict(cfg), "base_testbed": str(root.absolute()),
                   "construction": "reference model fine-tuned; of the value projections only the planted rows "
                                   "train; memorized prompts with the planted rows zeroed are trained towards the "
                                   "reference model's generation"}
        (tmp / PLANTED_FILE).write_text(json.dumps(planted, indent=1))
        card, grid = testbed_card(tmp / "model", tmp, TestbedConfig(), descriptor, progress=progress)
        grid.save(tmp / "grid.png")
        card = {"variant": "planted", "metric_backend": descriptor.name, "build_seconds": round(time.time() - start, 1),
                "seed": cfg.seed, "planted": {k: planted[k] for k in ("n_planted", "memorized", "config")}, **card}
        (tmp / "testbed_card.json").write_text(json.dumps(versioned(card), indent=2))
    return card


def planted_variant(base: str | Path | None, output_dir: str | Path | None, seed: int = 0, metric: str | None = None,
                    progress: bool = True, overwrite: bool = False) -> tuple[dict, Path]:
    """memtrain build-testbed --variant planted: the base testbed (default: the cached one,
    built first if missing) and the planted testbed (default: cached beside it)."""
    if base is None:
        build_or_reuse(None, seed=seed, metric=metric, progress=progress)
    root = Path(base) if base else default_testbed_dir(seed)
    out = Path(output_dir) if output_dir else planted_dir(root)
    if out.exists() and any(out.iterdir()) and not (out / "testbed_card.json").is_file() and not overwrite:
        raise MemtrainError(f"output dir '{out}' exists and is not a planted testbed: choose another or pass --overwrite")
    card = build_planted(root, out, PlantedConfig(seed=seed), metric=metric, progress=progress, overwrite=overwrite)
    return card, out


def _changed_rows(unet, before: dict) -> dict[str, list[int]]:
    """Value-projection rows that differ from the reference model (must be exactly the planted ones)."""
    modules = dict(unet.named_modules())
    return {name: (modules[name].weight.detach() != w).any(dim=1).nonzero().flatten().tolist()
            for name, w in before.items()}
